#!/usr/bin/env bash
# GPU check (issue #16 item 7): on a CUDA machine, run `fedshift bench --quick` and a quick
# one-round simulation, and print the device each silo trained on.
#
#   simulations/gpu_check.sh [OUT_DIR]        (default: runs/gpu-check-<UTC time>)
#
# Run from the repository root with the project's environment active. The silos' DP-SGD
# step runs under bf16 autocast on CUDA (fl_client.dp_train.train_round); `device = auto`
# picks cuda when torch sees one. Results: OUT/bench/bench.json, OUT/sim/metrics.json and
# OUT/gpu-check.txt (the summary printed at the end). Exit 1 when no GPU is visible or a
# silo did not train on one.
set -euo pipefail

OUT="${1:-runs/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

python - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device; nothing to check")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

mkdir -p "$OUT/bench"
echo "gpu_check: fedshift bench --quick (device auto = cuda)" >&2
python -m fedshift.cli bench --quick --json --out "$OUT/bench" > "$OUT/bench/stdout.json" || echo "gpu_check: bench exit $?" >&2

# Flower's simulation gives each virtual SuperNode a Ray actor; without a GPU share the actor
# may not see the device. Give each silo a quarter GPU where the simulate command accepts it.
FED=()
if python -m fedshift.cli simulate --help | grep -q -- "--federation-config"; then
  FED=(--federation-config client-resources-num-gpus=0.25)
fi
echo "gpu_check: fedshift simulate, 1 round ${FED[*]:-}" >&2
python -m fedshift.cli simulate --rounds 1 --out "$OUT/sim" --set device=auto "${FED[@]}"

python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
bench = json.loads((out / "bench" / "bench.json").read_text())
metrics = json.loads((out / "sim" / "metrics.json").read_text())
lines = [f"device: {bench['machine']['device']}",
         f"dp_step_ratio {bench['dp_step_ratio']}  payload_ratio {bench['payload_ratio']}  "
         f"recommend_p99_ms {bench['recommend_p99_ms']}"]
devices = {}
for r in metrics.get("records", []):
    if r.get("phase") == "train":
        devices.setdefault(r["silo"], set()).add(r.get("device") or "unreported")
lines += [f"silo {s}: trained on {', '.join(sorted(d))}" for s, d in sorted(devices.items())]
text = "\n".join(lines)
print(text)
(out / "gpu-check.txt").write_text(text + "\n")
if not devices or any(not any(d.startswith("cuda") for d in ds) for ds in devices.values()):
    sys.exit("gpu_check: a silo did not train on the GPU (see above)")
EOF

"""Secure aggregation of the silos' updates: the server learns only their weighted sum.

Pairwise masking with double masking after Bonawitz et al., "Practical Secure Aggregation
for Privacy-Preserving Machine Learning", ACM CCS 2017 (the semi-honest protocol; no
signature round, see docs/secure-aggregation.md). No Flower import here: the Flower stages
are thin glue in :mod:`fl_client.secure_aggregation` and :mod:`fl_server.secure_aggregation`.

* :mod:`.fixed_point`: real vectors <-> integers modulo 2^32, the range a silo must fit in
  and the quantisation error bound;
* :mod:`.shamir`: t-of-n Shamir secret sharing over the prime field GF(2^521 − 1);
* :mod:`.crypto`: X25519 key agreement, HKDF-SHA256, ChaCha20 mask streams and
  ChaCha20-Poly1305 encryption of the shares (all from ``cryptography``);
* :mod:`.protocol`: one silo's round (:class:`~.protocol.SiloRound`), the threshold rule
  and the server's reconstruction of the sum (:func:`~.protocol.unmask_sum`).
"""

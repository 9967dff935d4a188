"""Dataset tools: the converter that builds the bundled Arts–Office set from the raw Amazon
files (:mod:`.convert_amazon`) and the generator of synthetic datasets with planted
interest migration (:mod:`.generator`). Both write the format of docs/data-format.md."""

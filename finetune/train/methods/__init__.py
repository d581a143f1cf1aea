"""One small module per training method: its TRL config and trainer, how its first record is shown, and which of
its logged figures go into metrics.json. `METHODS` is the whole dispatch; the run path never branches on a name."""

from finetune.train.methods import dpo, kto, sft

METHODS = {"sft": sft, "dpo": dpo, "kto": kto}

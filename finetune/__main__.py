"""`python -m finetune ...`: the launch form `accelerate launch ... -m finetune run RECIPE` needs."""

from finetune.cli import main

main()

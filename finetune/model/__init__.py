"""Recipe → tokenizer and LoRA-ready Mixtral, used by the run, the planner, eval and export."""

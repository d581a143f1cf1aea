"""`finetune plan`: memory and time from the recipe and config.json alone, and the GPU table."""

"""`finetune eval`: did the fine-tune help? Base against adapter from one model load, in one table and eval.json.

The base column is the same loaded model with the adapter switched off (PEFT's `disable_adapter`, which our expert
LoRA honours), so the two columns differ by the adapter alone. One module per job: held-out perplexity
(`perplexity`), generation metrics on local files (`generation_tasks`), lm-evaluation-harness tasks
(`lm_eval_tasks`), what the adapter did to the router (`routing_shift`); `checks` refuses bad input before anything
loads, `run_eval` runs them in order and `table` prints the result.
"""

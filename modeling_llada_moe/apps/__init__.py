"""The app layer: the `llada-moe` command line, the OpenAI-compatible server, the lm-eval model, loading / prompting
helpers, Hub pushing, the user-facing decoding settings and the tiny offline model. The shipped model files (the flat
`modeling_llada_moe/*.py`) never import this package; import its modules directly (nothing is loaded here, so
importing the model does not pull in FastAPI or lm-eval)."""

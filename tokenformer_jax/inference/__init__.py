"""Use a trained model: load a checkpoint, evaluate it on any corpus, sample from it with a KV cache.

    from tokenformer_jax.inference import load_model, generate_text, evaluate, eval_stream
    model = load_model("runs/demo")                       # or "runs/demo/400": a given step
    print(generate_text(model, ["The Python"], max_new_tokens=32).texts[0])
    print(evaluate(model, eval_stream(model, "validation")))

The lm-evaluation-harness adapter is `tokenformer_jax.inference.lm_eval_adapter` (needs `lm_eval`).
"""
from tokenformer_jax.inference.decode import Generation, generate, generate_text, init_cache
from tokenformer_jax.inference.evaluate import eval_stream, evaluate, evaluate_images
from tokenformer_jax.inference.loading import LoadedModel, load_model, parse_checkpoint

__all__ = ["Generation", "LoadedModel", "eval_stream", "evaluate", "evaluate_images", "generate", "generate_text",
           "init_cache", "load_model", "parse_checkpoint"]

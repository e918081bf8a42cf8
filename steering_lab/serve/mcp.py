"""The lab's tools for agents: named API endpoints of the app that Gradio also serves as MCP tools
(``python app.py --mcp``; streamable HTTP at ``/gradio_api/mcp/``, SSE at ``/gradio_api/mcp/sse``).

Gradio names each tool after its function and describes it from the docstring: the first lines say
what the tool does, the ``Args:`` lines what each argument means (one line each: Gradio reads one
line per argument). Every tool is a plain function of its arguments that returns JSON; the ones that
run the model share the app's model queue.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import check
from ..intervene import OPERATORS, Steer
from .steering import resolve

MAX_PROMPTS = 32
MAX_TEXTS = 256


def tools(ctx) -> dict[str, tuple[Callable, bool]]:
    """``{api_name: (function, runs_the_model)}`` bound to ``ctx`` (the app's model and libraries)."""
    from ..ui.context import gpu, user_errors

    def list_vectors() -> list[dict]:
        """List the steering vectors in the library that fit the loaded model.

        Each entry has the vector's name (pass it to generate_steered, run_sweep or the OpenAI endpoint),
        where it comes from (shipped or user), the layer and strength it was calibrated for, how it was made,
        what positive strengths push towards, and its measured effect when one was recorded.
        """
        out = []
        for name in ctx.compatible_vectors():
            v = ctx.vectors.get(name)
            out.append({"name": name, "source": "user" if ctx.vectors.is_user(name) else "shipped",
                        "recommended_layer": v.recommended_layer, "recommended_strength": v.recommended_strength,
                        "layers": [min(v.layers), max(v.layers)], "method": v.method, "dataset": v.dataset,
                        "description": v.description, "effect": v.extra.get("effect", "")})
        return out

    def list_probes() -> list[dict]:
        """List the linear probes in the library that fit the loaded model (for score_with_probe).

        Each entry has the probe's name, the layer it reads, how it pools tokens, its two labels
        (a score near 1 means the first label), what it was trained on and its held-out test AUROC.
        """
        out = []
        for name in ctx.compatible(ctx.probes):
            p = ctx.probes.get(name)
            out.append({"name": name, "layer": p.layer, "pooling": p.pooling, "labels": list(p.labels),
                        "dataset": p.dataset, "description": p.description,
                        "test_auroc": p.metrics.get("test_auroc")})
        return out

    def generate_steered(prompt: str, vector: str, strength: float | None = None, max_new_tokens: int = 64,
                         layer: int | None = None, operator: str = "add", system: str = "") -> dict:
        """Answer a prompt twice in one batch, without and with a steering vector (greedy decoding).

        Args:
            prompt: The user message the model answers (the chat template is applied).
            vector: Name of a library vector (see list_vectors).
            strength: How hard to steer (for add: length added; negative flips the direction); empty = recommended.
            max_new_tokens: Most tokens to generate per answer (1-512).
            layer: Decoder block whose output is steered (0-based); empty = the vector's recommended layer.
            operator: add (h+s*v), ablate (remove; s in 0-1), clamp (projection set to s), rotate (s degrees) or
                transport (Linear-AcT vectors only; s in 0-1, 1 = full transport).
            system: Optional system prompt; empty = the model's default.
        Returns:
            {"baseline": the unsteered answer, "steered": the steered answer}
        """
        from ..generate import generate

        check(bool(prompt and prompt.strip()), "prompt is empty")
        check(1 <= int(max_new_tokens) <= 512, "max_new_tokens must be in 1..512")
        check(operator in OPERATORS, f"operator must be one of {', '.join(OPERATORS)}")
        item = {"vector": vector, "operator": operator}
        if strength is not None:
            item["strength"] = strength
        if layer is not None:
            item["layer"] = layer
        steers, specs = resolve(ctx, [item])
        # row 0 is left exactly as it is (unsteered, whatever the operator), row 1 is steered
        rows = Steer(steers[0].vector, specs[0].strength, layers=specs[0].layers, operator=operator,
                     rows=[False, True])
        texts = generate(ctx.lm, [prompt, prompt], rows, max_new_tokens=int(max_new_tokens),
                         system=(system or "").strip() or None)
        return {"baseline": texts[0], "steered": texts[1]}

    def extract_vector(preset: str = "", method: str = "mean_diff", layers: str = "", name: str = "api_vector",
                       positive: list[str] | None = None, negative: list[str] | None = None) -> dict:
        """Extract a steering vector from a bundled preset or from given contrast pairs and save it in the library.

        Args:
            preset: A bundled contrast set (sentiment, formality, harmful); empty when giving positive/negative.
            method: mean_diff (default), pca, actadd (uses the first pair only) or probe_weight.
            layers: Layers to extract at, e.g. 4-12 or 3,5,7; empty = all blocks.
            name: Library name to save under (letters, digits, '_', '-', '.'; must not exist yet).
            positive: Texts showing the behaviour (the + direction); pair i goes with negative[i].
            negative: Texts showing the opposite behaviour, as many as positive.
        Returns:
            The saved name, recommended layer and strength, the held-out AUROC at that layer, and the layers.
        """
        from ..ui.extract_tab import run_extract

        if positive or negative:
            check(not preset, "give either a preset or positive/negative pairs, not both")
            pairs = list(zip(positive or [], negative or []))
            check(len(positive or []) == len(negative or []),
                  f"positive and negative must have the same length ({len(positive or [])} vs {len(negative or [])})")
            summary, _ = run_extract(ctx, "table", None, None, None, method, layers, "auto", name, pairs=pairs)
        else:
            check(bool(preset), "give a preset name or positive and negative examples")
            summary, _ = run_extract(ctx, "preset", preset, None, None, method, layers, "auto", name)
        return summary

    def run_sweep(vector: str, strengths: list[float], prompt_set: str = "neutral", limit: int = 4,
                  max_new_tokens: int = 32, random_baseline: int = 0, layer: int | None = None) -> dict:
        """Sweep a vector's strength over a prompt set: behaviour against coherence cost at each strength.

        Args:
            vector: Name of a library vector (see list_vectors).
            strengths: Strengths to try, e.g. [0, -10, -20]; include 0 for the unsteered reference (at most 16).
            prompt_set: Bundled prompts: neutral, harmless, harmful, harmless-test or harmful-test.
            limit: How many prompts of the set to use (1-32).
            max_new_tokens: Tokens generated per answer (1-256).
            random_baseline: How many random directions of the same norm to sweep as a control (0-3).
            layer: Decoder block to steer at; empty = the vector's recommended layer.
        Returns:
            Per strength: refusal_rate, compliance, kl (to the unsteered model), perplexity, distinct2 and the samples.
        """
        from ..datasets import load_prompts
        from ..sweep import run_sweep as sweep

        check(isinstance(strengths, list) and 0 < len(strengths) <= 16, "give 1 to 16 strengths")
        check(1 <= int(limit) <= MAX_PROMPTS, f"limit must be in 1..{MAX_PROMPTS}")
        check(1 <= int(max_new_tokens) <= 256, "max_new_tokens must be in 1..256")
        check(0 <= int(random_baseline) <= 3, "random_baseline must be in 0..3")
        item = {"vector": vector, "strength": 0.0}
        if layer is not None:
            item["layer"] = layer
        steers, specs = resolve(ctx, [item])
        for s in strengths:
            resolve(ctx, [{**item, "strength": s}])  # each strength checked like a request's
        prompts = load_prompts(prompt_set)[: int(limit)]
        report = sweep(ctx.lm, steers[0].vector, [float(s) for s in strengths], prompts, layers=specs[0].layers,
                       random_baseline=int(random_baseline), max_new_tokens=int(max_new_tokens),
                       source={"prompt_source": prompt_set, "vector_name": specs[0].vector})
        keep = ("strength", "refusal_rate", "compliance", "kl", "perplexity", "distinct2", "samples")
        out = {"vector": specs[0].vector, "layers": report["layers"], "prompts": report["prompts"],
               "results": [{k: r[k] for k in keep} for r in report["results"]]}
        if "random_baseline_mean" in report:
            out["random_baseline_mean"] = report["random_baseline_mean"]
        return out

    def score_with_probe(probe: str, texts: list[str]) -> list[dict]:
        """Score texts with a linear probe: the probability that each text belongs to the probe's first label.

        Args:
            probe: Name of a library probe (see list_probes).
            texts: The texts to score (1-256), each read as a user message.
        Returns:
            One {"text", "score"} per text, score in [0, 1].
        """
        from ..probes import score_texts_with_probe
        from ..ui.library import validate_name

        check(isinstance(texts, list) and 0 < len(texts) <= MAX_TEXTS, f"give 1 to {MAX_TEXTS} texts")
        check(all(isinstance(t, str) and t.strip() for t in texts), "every text must be non-empty")
        p = ctx.probes.get(validate_name(probe))
        p.check_model(ctx.lm)
        scores = score_texts_with_probe(ctx.lm, p, texts)
        return [{"text": t, "score": float(s)} for t, s in zip(texts, scores)]

    return {
        "list_vectors": (user_errors(list_vectors), False),
        "list_probes": (user_errors(list_probes), False),
        "generate": (gpu(user_errors(generate_steered)), True),
        "extract": (gpu(user_errors(extract_vector)), True),
        "sweep": (gpu(user_errors(run_sweep)), True),
        "score_with_probe": (gpu(user_errors(score_with_probe)), True),
    }


def register(ctx) -> None:
    """Add the tools as named API endpoints of the Blocks being built (call inside ``gr.Blocks``).
    ``/generate`` and ``/extract`` keep the positional arguments they had before the tools existed."""
    import gradio as gr

    from ..ui.context import GENERATE_LIMIT, GENERATE_QUEUE, MODEL_QUEUE

    for api_name, (fn, model) in tools(ctx).items():
        if api_name == "generate":  # concurrent callers share the engine's batch
            gr.api(fn, api_name=api_name, concurrency_id=GENERATE_QUEUE, concurrency_limit=GENERATE_LIMIT)
        elif model:
            gr.api(fn, api_name=api_name, concurrency_id=MODEL_QUEUE, concurrency_limit=1)
        else:  # queued too (not on the model's queue): the call then carries a session, so in per-visitor
            # mode a client's own saved vectors are listed alongside the shipped ones
            gr.api(fn, api_name=api_name)

"""Model cards: the README.md that `export --adapter` / `--merged` write beside the weights.

Hub repositories read the YAML front matter (`base_model`, `library_name`, `tags`, `pipeline_tag`); people read
the rest: what the model was trained from and on, for how many steps, how well it did on the run's final
evaluation (with its 95% Wilson interval), how to load it, and the full recipe.

`base_model` is only written when the recipe's model is a Hub id ("org/name"): a local path or the builtin tiny
model would not resolve on the Hub. No license is claimed: the base model's license applies and is not known here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from lowres_reft import __version__

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def final_eval(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last evaluation of the run (the "final" one when present), or None when it never evaluated."""
    if not history:
        return None
    finals = [h for h in history if h.get("label") == "final"]
    return (finals or history)[-1]


def eval_line(entry: dict[str, Any] | None) -> str:
    """'0.625 on 200 problems (95% Wilson interval 0.556-0.690), step 60 (final)' or 'not evaluated'."""
    if not entry or not entry.get("n"):
        return "not evaluated"
    from lowres_reft.run.evaluation import wilson_interval

    n, accuracy = int(entry["n"]), float(entry["accuracy"])
    low, high = wilson_interval(round(accuracy * n), n)
    return (f"{accuracy:.3f} on {n} problems (95% Wilson interval {low:.3f}-{high:.3f}), "
            f"step {entry['step']} ({entry.get('label', '').replace('_', ' ')})")


def _names(value) -> str:
    return value if isinstance(value, str) else ", ".join(value)


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.fullmatch(name)) and not Path(name).expanduser().exists()


def render_model_card(recipe, recipe_toml: str, trainer_state: dict[str, Any], kind: Literal["adapter", "merged"],
                      merged_dtype: str | None = None) -> str:
    """The README.md text for an exported adapter or merged model."""
    model = recipe.model.name
    tags = ["lowres-reft", "nested-reft", "grpo", "reinforcement-learning", "math", "lora"]
    if recipe.model.load_in_4bit:
        tags.append("qlora")
    front = ["---"]
    if is_hub_id(model):
        front.append(f"base_model: {model}")
    front += [f"library_name: {'peft' if kind == 'adapter' else 'transformers'}", "pipeline_tag: text-generation", "tags:"]
    front += [f"- {t}" for t in tags] + ["---", ""]

    steps = trainer_state.get("step")
    title = f"{recipe.run_name}: {'LoRA adapter' if kind == 'adapter' else 'merged model'}"
    what = ("the LoRA adapter alone (load it on the base model)" if kind == "adapter" else
            f"the LoRA adapters merged into the dequantized base weights, saved in {merged_dtype} (a plain "
            "transformers model, no peft or bitsandbytes needed)")
    base = model + (f" (revision {recipe.model.revision})" if recipe.model.revision else "")
    body = [
        f"# {title}", "",
        f"RL fine-tuned with lowres-reft {__version__} (Nested-ReFT: GRPO on a "
        f"{'4-bit NF4' if recipe.model.load_in_4bit else '16-bit'} base with LoRA, rollouts from the same model with "
        f"a random subset of layers skipped, off-policy correction `{recipe.loss.correction}`). This directory holds "
        f"{what}.", "",
        "| | |", "|---|---|",
        f"| Base model | `{base}` |",
        f"| Training data | `{recipe.data.name}`{f' ({recipe.data.path})' if recipe.data.path else ''} |",
        f"| RL steps trained | {steps if steps is not None else 'unknown'} |",
        f"| Final eval accuracy (greedy) | {eval_line(final_eval(trainer_state.get('eval_history', [])))} |",
        f"| LoRA | r={recipe.lora.r}, alpha={recipe.lora.alpha}, targets {_names(recipe.lora.target_modules)} |",
        f"| Rewards | {_names(recipe.reward.functions)} |",
        f"| Tool | lowres-reft {__version__} |", "",
        "## Use", "",
    ]
    if kind == "adapter":
        body += ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                 f'base = AutoModelForCausalLM.from_pretrained("{model}")',
                 'model = PeftModel.from_pretrained(base, "path/to/this/dir")',
                 'tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")', "```", ""]
    else:
        body += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                 'model = AutoModelForCausalLM.from_pretrained("path/to/this/dir")',
                 'tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")', "```", "",
                 "It is a standard Hugging Face checkpoint (safetensors, config.json, tokenizer), so inference servers "
                 "that load those serve it as is, e.g. `vllm serve path/to/this/dir` (vLLM is not part of "
                 "lowres-reft's tests).", ""]
    body += ["Prompts: " + ("the tokenizer's chat template with the recipe's system prompt (below)"
                            if recipe.data.use_chat_template else "the plain template `Question: ...\\nAnswer:`") + ".", "",
             "## Recipe", "", "```toml", recipe_toml.strip(), "```", ""]
    return "\n".join(front + body)


def write_model_card(out_dir: Path, ckpt: Path, recipe, kind: Literal["adapter", "merged"],
                     merged_dtype: str | None = None) -> Path:
    """Write `out_dir/README.md` for checkpoint `ckpt` (its recipe.toml and trainer_state.json)."""
    state_file = ckpt / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8")) if state_file.is_file() else {}
    except ValueError:
        state = {}
    text = render_model_card(recipe, (ckpt / "recipe.toml").read_text(encoding="utf-8"), state, kind, merged_dtype)
    path = out_dir / "README.md"
    path.write_text(text, encoding="utf-8")
    return path

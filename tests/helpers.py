"""Independent re-implementations used as oracles by the tests (single sequences, no padding, plain hooks)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from hf_edit.architecture import base_layer
from hf_edit.tokens import reference_subject_last, target_ids


def module_io_at(model: nn.Module, module: nn.Module, ids: list[int], position: int) -> tuple[torch.Tensor, ...]:
    """Input and output of ``module`` at ``position`` for one unpadded sequence."""
    seen = {}

    def hook(_m, args, out):
        seen["in"], seen["out"] = args[0].detach(), out.detach()

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    inp = seen["in"].reshape(len(ids), -1) if seen["in"].dim() == 2 else seen["in"][0]
    out = seen["out"].reshape(len(ids), -1) if seen["out"].dim() == 2 else seen["out"][0]
    return inp[position].float(), out[position].float()


def reference_key(model, tokenizer, module, template: str, prompt: str, subject: str) -> tuple[torch.Tensor, ...]:
    """Key and value at the subject's last token, located with the reference's token arithmetic (GPT-2 BPE)."""
    filled_template = template.replace("{}", prompt)
    position = reference_subject_last(tokenizer, filled_template, subject)
    text = filled_template.replace("{}", subject)
    ids = tokenizer(text)["input_ids"]
    return module_io_at(model, module, ids, position)


def reference_value_rows(tokenizer, request, templates: list[str]) -> tuple[list[int], list[tuple], list[int], int]:
    """The v*/z rows of one request as the reference builds them, one unpadded sequence each: the target ids, then
    (template + prompt + target without its last token, subject's last position, prompt length) per template, and
    the KL row "<subject> is a" with its subject position."""
    target = target_ids(tokenizer, request.target_new)
    rows = []
    for template in templates:
        text = template.replace("{}", request.prompt)
        ids = tokenizer(text.replace("{}", request.subject))["input_ids"]
        rows.append((ids + target[:-1], reference_subject_last(tokenizer, text, request.subject), len(ids)))
    kl_ids = tokenizer(request.subject + " is a")["input_ids"]
    return target, rows, kl_ids, reference_subject_last(tokenizer, "{} is a", request.subject)


def weight_times(module: nn.Module, key: torch.Tensor) -> torch.Tensor:
    """W k + b for a Linear or Conv1D (the base layer), in float64."""
    layer = base_layer(module)
    weight = layer.weight.double()
    out = key.double() @ weight if weight.shape[0] == key.shape[0] and _is_conv1d(layer) else weight @ key.double()
    return out + (layer.bias.double() if layer.bias is not None else 0)


def _is_conv1d(layer: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(layer, Conv1D)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block (deterministic summation order), then restore the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def logits_without_hf_edit(base_dir, edit_dir, input_ids: torch.Tensor, work_dir) -> tuple[torch.Tensor, ...]:
    """Logits of the saved edit loaded in a fresh Python process that never imports hf_edit.

    Returns the logits with ``PeftModel.from_pretrained(base, edit_dir)`` and with
    ``AutoModelForCausalLM.from_pretrained(edit_dir)`` (transformers' own adapter loading), computed with one
    thread: compare them bitwise only with logits computed under :func:`one_thread` (with several threads, the
    order of a matmul's additions may depend on how many threads the library uses at that moment).
    """
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    work_dir = Path(work_dir)
    torch.save(input_ids, work_dir / "ids.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        ids = torch.load({str(work_dir / 'ids.pt')!r})
        base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r}, dtype=torch.float32)
        with torch.no_grad():
            torch.save(PeftModel.from_pretrained(base, {str(edit_dir)!r}).eval()(input_ids=ids).logits,
                       {str(work_dir / 'peft.pt')!r})
            native = AutoModelForCausalLM.from_pretrained({str(edit_dir)!r}, dtype=torch.float32).eval()
            torch.save(native(input_ids=ids).logits, {str(work_dir / 'native.pt')!r})
        assert "hf_edit" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    return torch.load(work_dir / "peft.pt"), torch.load(work_dir / "native.pt")

"""Batched optimisation of target values: MEMIT's ``compute_z``, and ROME's ``compute_v`` for many requests at once.

A *value problem* is one request (or several that share a key, see MEMIT-Merge): rewriting rows (a context
template, the prompt and the target without its last token), the position in each row where δ is added, the
target tokens of each row, and the KL rows ("<subject> is a").  For each problem a vector δ is added to the output
of one module at those positions and optimised with Adam, exactly as the reference optimises one request:

* loss = NLL + KL + WD, with NLL the mean over rows of the per-token mean target NLL, KL = ``kl_factor`` ·
  KL(P_δ ‖ P_0) of the next-token distribution at each KL row's position (P_0 recorded at the first step), WD =
  ``weight_decay`` · ‖δ‖ / ‖h‖², h the module's output at the first row's position before δ is added;
* stop when the loss is below ``early_stop_loss`` or at the last step, both before stepping (so at most
  ``num_steps − 1`` Adam steps);
* after every step, clamp ‖δ‖ to ``clamp_norm_factor`` · ‖h‖.

:func:`optimise_values` does this for many problems in one batched forward and backward pass per step: every
problem has its own δ row, its own Adam state (one parameter tensor each, so a problem that has stopped gets no
update at all, not even from momentum), its own clamp and its own early stop; the rows of finished problems leave
the batch.  The result equals optimising each problem alone (up to floating-point summation order; tested to 1e-5).
``chunk_size`` bounds how many problems share a batch (problems of similar row lengths are put together).

Most of a row does not depend on δ: the tokens before its first δ position.  They run once per batch composition,
into a key/value cache, and every step runs only the rest of each row against it (``reuse_prefix``; on
cf-facts-gpt2 the rest is 984 tokens of a chunk of 32 requests whose whole rows fill 6,048 padded positions).
Models that cannot continue from a cache run whole rows.

Two users:

* **MEMIT / EMMET / AlphaEdit** (``compute_z``): δ on the output of the decoder block of the last edited layer
  (the residual stream), at the subject's last token; ``frozen`` = the blocks up to and including that one (their
  outputs do not depend on δ, so they run once per batch composition); z = h + δ.
* **ROME** (``compute_v``), e.g. for independent v* optimisations of many requests in a single-edit evaluation::

      problems = [ValueProblem.build(tokenizer, [request], templates, "subject_last") for request in requests]
      results = optimise_values(model, c_proj, problems,
                                ValueSettings(num_steps=20, lr=0.5, clamp_norm_factor=4.0, kl_factor=0.0625,
                                              weight_decay=0.5), pad_id=pad_token_id(tokenizer),
                                frozen=decoder_layers[:edit_layer])
      v_star = [r.value for r in results]   # MLP output + δ at the subject's last token

  ``c_proj`` is the MLP output projection of the edited layer (ROME adds δ to its output), ``templates`` ROME's
  flat list of 21; the layers below the edited one are frozen.  ROME then turns v* into its rank-one update.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .architecture import num_layers, unwrap_model
from .errors import OptimizationError
from .hooks import as_batch_seq, cache_argument, only_positions, replay_outputs
from .requests import EditRequest
from .templates import encode_templated, value_positions
from .tokens import encode_with_subject, pad_batch, target_ids

__all__ = ["LogitLens", "ValueProblem", "ValueResult", "ValueSettings", "optimise_values"]


@dataclass(frozen=True)
class ValueSettings:
    """How δ is optimised (the reference's names in brackets).

    Attributes:
        num_steps: forward passes per problem (``v_num_grad_steps``); at most ``num_steps − 1`` Adam steps.
        lr: Adam learning rate (``v_lr``).
        clamp_norm_factor: ‖δ‖ ≤ clamp_norm_factor · ‖h‖ after every step.
        kl_factor: weight of the KL term.
        weight_decay: weight of ‖δ‖ / ‖h‖² (``v_weight_decay``).
        early_stop_loss: stop a problem once its loss is below this.
        reuse_prefix: run each row's tokens before its first δ position once per batch composition (their states
            do not depend on δ) and, at every step, only the rest of the row against their key/value cache.  The
            result is the same up to floating-point summation order; models whose forward takes no
            ``position_ids`` or no attention cache (or has non-attention layers) always run whole rows.
    """

    num_steps: int = 20
    lr: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    early_stop_loss: float = 5e-2
    reuse_prefix: bool = True

    @classmethod
    def from_config(cls, config: Any) -> ValueSettings:
        """The settings a method config names with the reference's hyperparameters (``v_num_grad_steps``,
        ``v_lr``, ``clamp_norm_factor``, ``kl_factor``, ``v_weight_decay``, ``early_stop_loss``)."""
        return cls(num_steps=config.v_num_grad_steps, lr=config.v_lr, clamp_norm_factor=config.clamp_norm_factor,
                   kl_factor=config.kl_factor, weight_decay=config.v_weight_decay,
                   early_stop_loss=config.early_stop_loss)


@dataclass(frozen=True)
class ValueProblem:
    """The rows of one δ.

    A problem has one δ per *slot*.  Usually there is one slot, and each row names one position; a row may instead
    name a tuple of positions, one per slot (slot 0 first; e.g. every subject token, last first), and rows may
    have fewer slots than others.  The problem has as many slots as its longest tuple.

    Attributes:
        rows: rewriting rows: context ids followed by the target's ids without the last one.
        positions: where δ is added in each rewriting row: a position, or one position per slot.
        targets: each row's target ids; the row's last ``len(targets[r])`` positions predict them.
        kl_rows: rows of the KL term (ids); δ is added at ``kl_positions`` and the distribution read at slot 0's.
        kl_positions: the position(s) of each KL row.
        label: a name for messages (e.g. the subject).
    """

    rows: tuple[tuple[int, ...], ...]
    positions: tuple[int | tuple[int, ...], ...]
    targets: tuple[tuple[int, ...], ...]
    kl_rows: tuple[tuple[int, ...], ...] = ()
    kl_positions: tuple[int | tuple[int, ...], ...] = ()
    label: str = ""

    def __post_init__(self) -> None:
        if not self.rows or len(self.rows) != len(self.positions) or len(self.rows) != len(self.targets):
            raise ValueError("A ValueProblem needs at least one row, and one position and target per row.")
        if len(self.kl_rows) != len(self.kl_positions):
            raise ValueError("A ValueProblem needs one position per KL row.")
        for row, target in zip(self.rows, self.targets):
            if not target or len(row) < len(target):
                raise ValueError("Every rewriting row must end with its target's ids but the last one.")
        if any(not _slots(p) for p in (*self.positions, *self.kl_positions)):
            raise ValueError("A row's tuple of positions must not be empty.")

    @property
    def n_slots(self) -> int:
        """How many δ this problem has per module."""
        return max(len(_slots(p)) for p in (*self.positions, *self.kl_positions))

    def spans(self) -> list[tuple[int, int]]:
        """The part of each row (rewriting rows, then KL rows) that depends on δ and is read: from its first δ
        position (or first label) to its end (a KL row: to its last δ position)."""
        rewrite = [(min(*_slots(position), len(row) - len(target)), len(row))
                   for row, position, target in zip(self.rows, self.positions, self.targets)]
        return rewrite + [(min(_slots(position)), max(_slots(position)) + 1) for position in self.kl_positions]

    @classmethod
    def build(cls, tokenizer: Any, requests: Sequence[EditRequest], templates: Sequence[str],
              fact_token: str = "subject_last") -> ValueProblem:
        """The reference's rows for ``requests`` (normally one; several that share a subject for MEMIT-Merge):
        every template with every request's prompt and target, and one KL row ``"<subject> is a"`` (the first
        request's subject).  δ goes at the fact token of each row; with ``fact_token="subject"`` one δ per subject
        token, counted from the last (:func:`~hf_edit.templates.value_positions`)."""
        rows, positions, targets = [], [], []
        for request in requests:
            target = target_ids(tokenizer, request.target_new)
            for template in templates:
                encoded = encode_templated(tokenizer, template, request)
                rows.append(tuple(encoded.ids + target[:-1]))
                positions.append(_one_or_slots(value_positions(encoded, fact_token)))
                targets.append(tuple(target))
        kl = encode_with_subject(tokenizer, "", requests[0].subject, " is a")
        return cls(rows=tuple(rows), positions=tuple(positions), targets=tuple(targets), kl_rows=(tuple(kl.ids),),
                   kl_positions=(_one_or_slots(value_positions(kl, fact_token)),), label=requests[0].subject)


def _slots(position: int | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(position) if isinstance(position, (tuple, list)) else (int(position),)


def _one_or_slots(positions: tuple[int, ...]) -> int | tuple[int, ...]:
    return positions[0] if len(positions) == 1 else positions


@dataclass
class ValueResult:
    """The optimised δ of one problem.

    Attributes:
        delta: δ, (width,), float32; with several modules (modules, width); with several slots a (slots,)
            dimension before the width, e.g. (modules, slots, width).
        init: h, the module's output at the first row's position (of each slot) before δ, shaped like ``delta``.
        info: steps (forward passes), loss, nll, kl, weight_decay, target_probability (e^−NLL), clamped (whether
            any step was clamped), norm_delta, norm_init, clamp_ratio (‖δ‖ / (clamp_norm_factor · ‖h‖): 1 means
            the δ ended on the clamp's sphere).
    """

    delta: torch.Tensor
    init: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> torch.Tensor:
        """h + δ (MEMIT's z, ROME's v*)."""
        return self.init + self.delta


@dataclass(frozen=True)
class LogitLens:
    """Read the target NLL from an intermediate block's output instead of the model's logits: log-softmax of
    ``head(norm(block output))`` (the reference's ``v_loss_layer`` when it is not the last layer)."""

    block: nn.Module
    norm: nn.Module
    head: nn.Module


def _hidden(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output  # type: ignore[index]


def _with_hidden(output: object, hidden: torch.Tensor) -> object:
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


class _Layout:
    """The batch of the active problems: ids, where δ goes, which logits are read, and how they map back.

    δ entries: the active problems' δ rows of one module, concatenated problem after problem and slot after slot,
    are added at ``(entry_rows, entry_positions)`` from row ``entry_index``; h is recorded at ``init_*`` (the first
    row that has the slot).

    With ``split``, each row is cut before its first δ position: ``prefix`` holds the tokens before (left-padded;
    their states do not depend on δ), ``inputs`` the rest (right-padded), and every position counts from the cut.
    """

    def __init__(self, problems: Sequence[ValueProblem], active: Sequence[int], pad_id: int,
                 device: torch.device, split: bool = False) -> None:
        rewrite, kl = [], []
        for local, p in enumerate(active):
            problem = problems[p]
            rewrite += [(local, row, _slots(pos), tgt) for row, pos, tgt in
                        zip(problem.rows, problem.positions, problem.targets)]
            kl += [(local, row, _slots(pos)) for row, pos in zip(problem.kl_rows, problem.kl_positions)]
        ids = [r[1] for r in rewrite] + [k[1] for k in kl]
        cuts = [0] * len(ids)
        if split:  # each row from its first δ position to its last read one; the tokens before become the prefix
            per_problem = [(problems[p].spans(), len(problems[p].rows)) for p in active]
            spans = [span for all_spans, n in per_problem for span in all_spans[:n]]
            spans += [span for all_spans, n in per_problem for span in all_spans[n:]]
            ids = [row[:end] for row, (_start, end) in zip(ids, spans)]
            cuts = [start for start, _end in spans]
        self.prefix = _left_pad([row[:cut] for row, cut in zip(ids, cuts)], pad_id, device) if max(cuts) else None
        self.past: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.inputs = pad_batch([row[cut:] for row, cut in zip(ids, cuts)], pad_id, device)
        self.shape = tuple(self.inputs["input_ids"].shape)
        self.n_active = len(active)
        self.n_rewrite = len(rewrite)
        self.row_problem = torch.tensor([r[0] for r in rewrite] + [k[0] for k in kl], device=device)
        self.row_positions = torch.tensor([r[2][0] - cut for r, cut in zip(rewrite + kl, cuts)], device=device)
        self.n_slots = [problems[p].n_slots for p in active]
        offsets = [sum(self.n_slots[:local]) for local in range(len(active))]
        entry_rows, entry_positions, entry_index, first = [], [], [], {}
        for index, (local, _ids, slots, *_rest) in enumerate(rewrite + kl):
            for slot, position in enumerate(slots):
                entry_rows.append(index)
                entry_positions.append(position - cuts[index])
                entry_index.append(offsets[local] + slot)
                first.setdefault(offsets[local] + slot, (index, position - cuts[index]))
        self.entry_rows = torch.tensor(entry_rows, device=device)
        self.entry_positions = torch.tensor(entry_positions, device=device)
        self.entry_index = torch.tensor(entry_index, device=device)
        order = sorted(first)
        self.init_rows = torch.tensor([first[i][0] for i in order], device=device)
        self.init_positions = torch.tensor([first[i][1] for i in order], device=device)
        label_rows, label_pos, label_ids = [], [], []
        for index, (_local, row, _pos, target) in enumerate(rewrite):
            start = len(row) - len(target) + 1  # the row holds target[:-1]; position start-1+i predicts target[i]
            for i, token in enumerate(target):
                label_rows.append(index)
                label_pos.append(start - 1 + i - cuts[index])
                label_ids.append(token)
        self.label_rows = torch.tensor(label_rows, device=device)
        self.label_positions = torch.tensor(label_pos, device=device)
        self.label_ids = torch.tensor(label_ids, device=device)
        self.row_lengths = torch.tensor([len(r[3]) for r in rewrite], dtype=torch.float32, device=device)
        self.rewrite_problem = self.row_problem[:self.n_rewrite]
        self.rows_per_problem = torch.bincount(self.rewrite_problem, minlength=len(active)).float()
        self.kl_rows = torch.arange(self.n_rewrite, len(ids), device=device)
        self.kl_positions = self.row_positions[self.n_rewrite:]
        self.kl_problem = self.row_problem[self.n_rewrite:]
        self.kl_per_problem = torch.bincount(self.kl_problem, minlength=len(active)).float()

    def model_inputs(self, cache_name: str | None) -> dict[str, Any]:
        """The keyword arguments of one forward pass over the rows (after the cut, against the prefix's cache)."""
        if self.past is None:
            return dict(self.inputs, use_cache=False)
        mask = torch.cat([self.prefix["attention_mask"], self.inputs["attention_mask"]], dim=1)
        positions = _mask_positions(mask)[:, self.prefix["attention_mask"].shape[1]:]
        return {"input_ids": self.inputs["input_ids"], "attention_mask": mask, "position_ids": positions,
                cache_name: DynamicCache(ddp_cache_data=self.past), "use_cache": True}


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-pad id lists into ``input_ids``, ``attention_mask`` and ``position_ids`` (0 on padding)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    mask = mask.to(device)
    return {"input_ids": ids.to(device), "attention_mask": mask, "position_ids": _mask_positions(mask)}


def _mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position among its row's unmasked tokens (padding: that of the last token before it, or 0)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _prefix_cache_argument(model: nn.Module) -> str | None:
    """The name of the model's key/value cache argument when its forward can continue rows from a cache of their
    prefixes (it takes ``position_ids`` and a cache, and has attention layers only); ``None`` otherwise."""
    base = unwrap_model(model)
    layer_types = getattr(base.config.get_text_config(), "layer_types", None) or ()
    if "position_ids" not in inspect.signature(base.forward).parameters or \
            not set(layer_types) <= {"full_attention", "sliding_attention"}:
        return None
    return cache_argument(model)


@torch.no_grad()
def _prefix_states(model: nn.Module, layout: _Layout,
                   cache_name: str) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Run the rows' prefixes once and return each layer's keys and values (zero on padding), or ``None`` when the
    model did not fill a plain per-layer cache for them (the rows then run whole)."""
    assert layout.prefix is not None
    cache = DynamicCache()
    head = model.get_output_embeddings()
    n_rows, width = layout.prefix["input_ids"].shape
    rows = torch.arange(n_rows, device=layout.prefix["input_ids"].device)
    with only_positions(head, rows, torch.full_like(rows, width - 1)):  # no logits but one per row
        model(**layout.prefix, use_cache=True, **{cache_name: cache})
    keep = layout.prefix["attention_mask"][:, None, :, None]
    states = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if type(layer) is not DynamicLayer or keys is None or keys.dim() != 4 or keys.shape[-2] != width \
                or keys.shape[0] != keep.shape[0]:
            return None
        mask = keep.to(device=keys.device, dtype=keys.dtype)  # layers may sit on other devices (device_map)
        states.append((keys * mask, values * mask))
    return states if len(states) == num_layers(unwrap_model(model)) else None


def optimise_values(model: nn.Module, module: nn.Module | Sequence[nn.Module], problems: Sequence[ValueProblem],
                    settings: ValueSettings, *, pad_id: int, chunk_size: int | None = None,
                    frozen: Sequence[nn.Module] = (), lens: LogitLens | None = None, progress: bool = False,
                    description: str = "values") -> list[ValueResult]:
    """Optimise one δ per problem, added to ``module``'s output at the problems' positions (see the module doc).

    The model's parameters must not require gradients (use :func:`hf_edit.hooks.frozen_eval`).

    Args:
        model: the causal LM (as it is now: adapters and temporary hooks active).
        module: the module whose output (a tensor, or a tuple whose first element is the hidden states) gets δ;
            or several modules (e.g. the MLP projections of several layers), each with its own δ, optimised jointly:
            the loss's weight decay is the sum over modules, the clamp applies to each module's δ against that
            module's h, and every result's ``delta``/``init`` is then (modules, width) instead of (width,).
        problems: one per δ (per module and slot: a problem whose rows name several positions has one δ per
            slot, each clamped against its own h and summed in the weight decay).
        settings: the optimisation's hyperparameters.
        pad_id: padding id (right padding).
        chunk_size: problems optimised together (``None``: all).
        frozen: modules whose outputs do not depend on δ (e.g. the decoder layers up to ``module``'s); each runs
            once per batch composition and is replayed at later steps.
        lens: read the NLL through a logit lens at an intermediate layer instead of the model's logits.
        progress: show a progress bar over the problems (advanced as each one stops), for two or more.
        description: the progress bar's label.

    Raises:
        OptimizationError: a problem's loss became NaN or infinite (its label names it).
    """
    modules = [module] if isinstance(module, nn.Module) else list(module)
    if not modules:
        raise ValueError("optimise_values needs at least one module.")
    size = len(problems) if not chunk_size else max(1, int(chunk_size))
    order = list(range(len(problems)))
    if settings.reuse_prefix and size < len(problems):  # chunks of similar lengths: less padding
        order.sort(key=lambda p: max(end - start for start, end in problems[p].spans()))
    cache_name = _prefix_cache_argument(model) if settings.reuse_prefix else None
    results: dict[int, ValueResult] = {}
    with _progress_bar(len(problems) if progress else 0, description) as bar:
        for start in range(0, len(problems), size):
            chunk = order[start:start + size]
            done = _optimise_chunk(model, modules, [problems[p] for p in chunk], settings, pad_id=pad_id,
                                   frozen=frozen, lens=lens, one_module=isinstance(module, nn.Module),
                                   cache_name=cache_name, on_stop=bar.update)
            results.update(zip(chunk, done))
    return [results[p] for p in range(len(problems))]


@contextmanager
def _progress_bar(total: int, description: str) -> Iterator[Any]:
    """A tqdm bar over ``total`` problems, or (for fewer than two) an object whose ``update`` does nothing."""
    if total < 2:
        yield SimpleNamespace(update=lambda n=1: None)
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=description, leave=False) as bar:
        yield bar


def _optimise_chunk(model: nn.Module, modules: list[nn.Module], problems: Sequence[ValueProblem],
                    settings: ValueSettings, *, pad_id: int, frozen: Sequence[nn.Module], lens: LogitLens | None,
                    one_module: bool, cache_name: str | None,
                    on_stop: Callable[[int], object] = lambda n: None) -> list[ValueResult]:
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    n = len(problems)
    state = _State([p.n_slots for p in problems], len(modules), device)
    log_p0: list[torch.Tensor | None] = [None] * n
    steps, clamped = [0] * n, [False] * n
    final: dict[int, dict[str, float]] = {}
    active = list(range(n))
    layout: _Layout | None = None
    optimiser: torch.optim.Adam | None = None
    with ExitStack() as replay:
        for it in range(settings.num_steps):
            if not active:
                break
            if layout is None:  # a new batch composition: rebuild it and restart the replay of frozen modules
                replay.close()
                layout = _Layout(problems, active, pad_id, device, split=cache_name is not None)
                if layout.prefix is not None:
                    layout.past = _prefix_states(model, layout, cache_name)
                    if layout.past is None:  # the model filled no plain cache: whole rows from now on
                        cache_name = None
                        layout = _Layout(problems, active, pad_id, device)
                replay.enter_context(replay_outputs(frozen))
            nll, kl_logp = _forward(model, modules, head, lens, layout, state, active, cache_name)
            if optimiser is None:
                optimiser = torch.optim.Adam(state.deltas, lr=settings.lr)
            kl = torch.zeros(layout.n_active, device=device)
            if kl_logp.shape[0]:
                for local, p in enumerate(active):
                    if log_p0[p] is None:
                        log_p0[p] = kl_logp[layout.kl_problem == local].detach()
                p0 = torch.cat([log_p0[p] for p in active])
                per_row = (kl_logp.exp() * (kl_logp - p0)).sum(-1)
                kl = kl.index_add(0, layout.kl_problem, per_row) / layout.kl_per_problem.clamp_min(1)
                kl = settings.kl_factor * kl
            init_norm = [state.inits[p].norm(dim=-1) for p in active]  # (modules, slots) each
            weight_decay = settings.weight_decay * torch.stack(
                [(state.deltas[p].norm(dim=-1) / init_norm[local] ** 2).sum() for local, p in enumerate(active)])
            total = nll + kl + weight_decay
            values = total.detach().cpu()
            for local, p in enumerate(active):
                steps[p] += 1
                if not torch.isfinite(values[local]):
                    raise OptimizationError(
                        f"The z optimisation for {problems[p].label!r} produced a non-finite loss at step {it}. "
                        "Nothing was applied; try a smaller v_lr or check the model's precision.")
            finished = {local for local in range(len(active))
                        if values[local].item() < settings.early_stop_loss or it == settings.num_steps - 1}
            for local in finished:
                final[active[local]] = dict(loss=values[local].item(), nll=nll[local].item(), kl=kl[local].item(),
                                            weight_decay=weight_decay[local].item())
            going = [local for local in range(len(active)) if local not in finished]
            if going:
                chosen = [state.deltas[active[local]] for local in going]
                grads = torch.autograd.grad(total[going].sum(), chosen)
                for param in state.deltas:
                    param.grad = None
                for param, grad in zip(chosen, grads):
                    param.grad = grad
                optimiser.step()
                with torch.no_grad():
                    for local in going:
                        p = active[local]
                        max_norm = settings.clamp_norm_factor * init_norm[local]  # (modules, slots)
                        norm = state.deltas[p].norm(dim=-1)
                        over = norm > max_norm
                        if over.any():
                            clamped[p] = True
                            state.deltas[p][over] *= (max_norm[over] / norm[over])[:, None]
            if finished:
                on_stop(len(finished))
                active = [active[local] for local in going]
                layout = None
    results = []
    for p in range(n):
        delta = state.deltas[p].detach().clone()  # (modules, slots, width)
        init = state.inits[p].detach().clone()
        if problems[p].n_slots == 1:
            delta, init = delta[:, 0], init[:, 0]
        if one_module:
            delta, init = delta[0], init[0]
        norm_delta, norm_init = delta.norm(dim=-1), init.norm(dim=-1)
        ratio = norm_delta / (settings.clamp_norm_factor * norm_init)

        def scalar(x: torch.Tensor) -> float | list[float]:
            return x.item() if x.numel() == 1 else x.tolist()

        info = dict(final[p], steps=steps[p], clamped=clamped[p],
                    target_probability=float(torch.exp(torch.tensor(-final[p]["nll"])).item()),
                    norm_delta=scalar(norm_delta), norm_init=scalar(norm_init), clamp_ratio=scalar(ratio))
        results.append(ValueResult(delta=delta, init=init, info=info))
    return results


class _State:
    """The δ parameters, one (modules, slots, width) tensor per problem (created at the first forward pass, when the
    width is known), and the h of each problem at each module and slot, shaped alike."""

    def __init__(self, n_slots: Sequence[int], n_modules: int, device: torch.device) -> None:
        self.n_slots, self.n_modules, self.device = list(n_slots), n_modules, device
        self.deltas: list[torch.Tensor] = []
        self.inits: list[torch.Tensor] = []
        self.width: int | None = None
        self.recorded: set[int] = set()

    def record(self, m: int, inits: torch.Tensor) -> None:
        """h of every problem and slot at module ``m``, (Σ slots, width) (first pass only; all problems are active
        then)."""
        if self.width is None:
            self.width = inits.shape[1]
            self.inits = [torch.zeros(self.n_modules, s, self.width, dtype=torch.float32, device=self.device)
                          for s in self.n_slots]
            self.deltas = [torch.zeros(self.n_modules, s, self.width, dtype=torch.float32, device=self.device,
                                       requires_grad=True) for s in self.n_slots]
        if inits.shape[1] != self.width:
            raise ValueError("Jointly optimised modules must have outputs of one width.")
        for p, part in enumerate(inits.detach().float().split(self.n_slots)):
            self.inits[p][m] = part
        self.recorded.add(m)


def _forward(model: nn.Module, modules: list[nn.Module], head: nn.Module, lens: LogitLens | None, layout: _Layout,
             state: _State, active: list[int], cache_name: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One batched forward pass with δ added at every row's position.

    Returns the NLL of each active problem and the log-probabilities at the KL rows.  At the first pass (all
    problems active) h is recorded before δ (then zero) is added, and the δ parameters are created.
    """
    shape = layout.shape

    def make_hook(m: int):
        def add_delta(_module: nn.Module, _args: tuple, output: object) -> object:
            hidden = _hidden(output)
            h = as_batch_seq(hidden, shape)
            if m not in state.recorded:
                state.record(m, h[layout.init_rows, layout.init_positions])
            per_entry = torch.cat([state.deltas[p][m] for p in active])[layout.entry_index]
            update = torch.zeros_like(h)
            update[layout.entry_rows, layout.entry_positions] = per_entry.to(h.dtype)
            return _with_hidden(output, (h + update).reshape(hidden.shape))
        return add_delta

    lens_out: dict[str, torch.Tensor] = {}

    def read_lens(_module: nn.Module, _args: tuple, output: object) -> None:
        h = as_batch_seq(_hidden(output), shape)
        lens_out["h"] = h[layout.label_rows, layout.label_positions]

    handles = [module.register_forward_hook(make_hook(m)) for m, module in enumerate(modules)]
    if lens is not None:
        handles.append(lens.block.register_forward_hook(read_lens))
        head_rows, head_positions = layout.kl_rows, layout.kl_positions
    else:
        head_rows = torch.cat([layout.label_rows, layout.kl_rows])
        head_positions = torch.cat([layout.label_positions, layout.kl_positions])
    try:
        with only_positions(head, head_rows, head_positions):
            logits = model(**layout.model_inputs(cache_name)).logits[0].float()
    finally:
        for handle in handles:
            handle.remove()
    if lens is not None:
        label_logits = lens.head(lens.norm(lens_out["h"][None]))[0].float()
        kl_logits = logits
    else:
        n_labels = layout.label_rows.shape[0]
        label_logits, kl_logits = logits[:n_labels], logits[n_labels:]
    token_logp = torch.log_softmax(label_logits, dim=-1).gather(-1, layout.label_ids[:, None])[:, 0]
    row_nll = -torch.zeros(layout.n_rewrite, device=token_logp.device).index_add(0, layout.label_rows, token_logp)
    row_nll = row_nll / layout.row_lengths
    nll = torch.zeros(layout.n_active, device=row_nll.device).index_add(0, layout.rewrite_problem, row_nll)
    return nll / layout.rows_per_problem, torch.log_softmax(kl_logits, dim=-1)

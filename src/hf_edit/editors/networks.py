"""Editor networks (MEND and KE) and the artifact they are shared as.

An :class:`EditorNetwork` is an ``nn.Module`` trained for one base model.  It maps the gradient factors of the
edited matrices (:class:`~hf_edit.editors.matrices.GradientFactors`) to exact low-rank factors ΔW = B A of each
matrix, in the Linear orientation:

* :class:`MENDNetwork` (Mitchell et al.; methods spec §3): one gradient transform per matrix shape, shared by the
  matrices of that shape with a per-matrix "mode" scale and shift; inputs normalised by running statistics; a
  learned step size per matrix.  ΔW = η Δ̃ᵀ Ũ, rank n (the contributing tokens).
* :class:`KENetwork` (De Cao et al., as re-implemented in the MEND repository; spec §2): a bidirectional LSTM
  encodes the edit sentence; a head per matrix predicts a gradient mask and an offset.  ΔW = s (Σ_t (β⊙g_t)(α⊙x_t)ᵀ
  + δ γᵀ), rank T + 1.

The artifact is a folder (or a Hub model repo) holding ``editor_config.json`` (kind, network hyperparameters, edited
matrices, the base model's id and weight fingerprint, how it was trained), ``editor.safetensors`` (weights and
normalisation statistics) and ``README.md`` (a model card).  :meth:`EditorNetwork.from_pretrained` reads it back;
:meth:`EditorNetwork.check_base_model` refuses a model whose weights differ from the one it was trained for.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..architecture import unwrap_model
from ..errors import ConfigError, EditorMismatchError, EditorNetworkError
from ..version import __version__
from .matrices import EditedMatrix, GradientFactors, find_edited_matrices

__all__ = ["EditorNetwork", "MENDNetwork", "KENetwork", "MENDNetworkConfig", "KENetworkConfig",
           "EditorMismatchError", "EditorNetworkError", "BaseModelInfo", "base_weights_fingerprint",
           "EDITOR_CONFIG_NAME", "EDITOR_WEIGHTS_NAME", "EDITOR_FORMAT"]

EDITOR_CONFIG_NAME = "editor_config.json"
EDITOR_WEIGHTS_NAME = "editor.safetensors"
EDITOR_FORMAT = "hf_edit.editor-network.v1"
_NORM_EPS = 1e-7  # the reference's σ + 1e-7


# -- the base model's identity -------------------------------------------------------------------------------------
def base_weights_fingerprint(model: nn.Module) -> str:
    """A fingerprint of the base weights of ``model`` (LoRA parameters and PEFT's ``.base_layer`` ignored).

    It hashes every parameter's and buffer's name and shape, and a strided sample of up to 4,096 of its values
    (cast to float32), so a model loaded from a Hub id and the same weights saved to a local folder agree, and
    any different model (another checkpoint, a fine-tune, another architecture) differs.  Loading in another dtype
    changes it.
    """
    inner = unwrap_model(model)
    digest = hashlib.sha256()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in [*inner.named_parameters(), *inner.named_buffers()]:
        if "lora_" in name:
            continue
        tensors.setdefault(name.replace(".base_layer.", "."), tensor)
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.device.type == "meta" or not tensor.is_floating_point():
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            continue
        flat = tensor.detach().reshape(-1)
        flat = flat[:: max(1, flat.numel() // 4096)].float().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(flat.numpy()).cast("B"))
    return digest.hexdigest()


@dataclass(frozen=True)
class BaseModelInfo:
    """Which model an editor network belongs to.

    Attributes:
        name_or_path: the id or path the base model was loaded from (informational).
        fingerprint: :func:`base_weights_fingerprint` of its weights (what is checked).
        model_type: ``config.model_type``.
        dtype: the dtype of its weights when the editor was trained.
        vocab_size, embedding_dim: the shape of its input embedding.
    """

    name_or_path: str | None
    fingerprint: str
    model_type: str
    dtype: str
    vocab_size: int
    embedding_dim: int

    @classmethod
    def of(cls, model: nn.Module) -> BaseModelInfo:
        inner = unwrap_model(model)
        config = inner.config
        name = getattr(inner, "name_or_path", None) or getattr(config, "_name_or_path", None) or None
        embedding = inner.get_input_embeddings()
        return cls(name_or_path=str(name) if name else None, fingerprint=base_weights_fingerprint(inner),
                   model_type=str(config.model_type), dtype=str(next(inner.parameters()).dtype).removeprefix("torch."),
                   vocab_size=int(embedding.weight.shape[0]), embedding_dim=int(embedding.weight.shape[1]))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> BaseModelInfo:
        return cls(**{f.name: values.get(f.name) for f in fields(cls)})


# -- network hyperparameters ---------------------------------------------------------------------------------------
def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")


@dataclass(frozen=True)
class MENDNetworkConfig:
    """MEND's editor network (the reference's ``alg/mend.yaml``: ``combine=True``, ``mlp_class=IDMLP``,
    ``init=id``, ``act``/``hidden_dim`` unused by IDMLP).

    Args:
        rank: rank of each low-rank residual block; ``min(rank, in + out)`` is used (reference: 1920).
        n_hidden: hidden blocks; the network has ``n_hidden + 1`` residual blocks (reference: 1).
        norm: normalise u and δ by running mean and standard deviation (reference: True).
        shared: one transform per matrix shape, with a per-matrix mode (reference: True); ``False``: one per
            matrix.
        edit_lr: initial value of each matrix's learned step size η (reference ``alg/mend.yaml``: 1e-4).
        seed: seed of the random initialisation (the V factors, N(0, 1) elementwise as in the reference).
    """

    rank: int = 1920
    n_hidden: int = 1
    norm: bool = True
    shared: bool = True
    edit_lr: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_int("rank", self.rank)
        if not isinstance(self.n_hidden, int) or self.n_hidden < 0:
            raise ConfigError(f"n_hidden must be a non-negative integer, got {self.n_hidden!r}.")
        if not (isinstance(self.edit_lr, (int, float)) and math.isfinite(self.edit_lr)):
            raise ConfigError(f"edit_lr must be a finite number, got {self.edit_lr!r}.")


@dataclass(frozen=True)
class KENetworkConfig:
    """KE's editor network (``OneShotLearner`` as the MEND repository builds it for ``alg/efk.yaml``).

    Args:
        hidden_dim: width of each matrix head's hidden layer (reference: 512).
        condition_dim: width of the condition vector (reference: 768).
        lstm_hidden: hidden size per direction of the bidirectional LSTM (reference: 512).
        max_scale: the update's scale is ``max_scale · sigmoid(η)`` (reference: 1).
        seed: seed of the random initialisation.
    """

    hidden_dim: int = 512
    condition_dim: int = 768
    lstm_hidden: int = 512
    max_scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden_dim", "condition_dim", "lstm_hidden"):
            _positive_int(name, getattr(self, name))
        if not (isinstance(self.max_scale, (int, float)) and self.max_scale > 0):
            raise ConfigError(f"max_scale must be positive, got {self.max_scale!r}.")


# -- the artifact base class ---------------------------------------------------------------------------------------
class EditorNetwork(nn.Module):
    """A trained editor network for one base model: MEND (:class:`MENDNetwork`) or KE (:class:`KENetwork`).

    Build an untrained one with :meth:`create`, train it with :func:`hf_edit.editors.train_editor`, share it with
    :meth:`save_pretrained` / :meth:`push_to_hub`, load it with :meth:`from_pretrained`, and edit with it through
    ``MENDConfig(editor=...)`` / ``KEConfig(editor=...)``.

    Attributes:
        matrices: the edited matrices, in order.
        config: the network hyperparameters.
        base_model: the base model it was built for.
        training_info: how it was trained (data, its fingerprint, exclusions, hyperparameters, steps, metrics).
    """

    kind: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    #: Whether the edits of one training step pass through the network together, as one inner batch (MEND), or
    #: one at a time, each conditioned on its own tokens (KE).
    joint_edits: ClassVar[bool] = False
    #: Whether the network normalises the gradient factors with running statistics collected while training
    #: (MEND's ``statistics_of`` / ``observe``).
    collects_statistics: ClassVar[bool] = False
    _kinds: ClassVar[dict[str, type[EditorNetwork]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            EditorNetwork._kinds[cls.kind] = cls

    def __init__(self, matrices: Sequence[EditedMatrix], config: Any, base_model: BaseModelInfo,
                 training: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if not matrices:
            raise ConfigError("An editor network needs at least one matrix to edit.")
        self.matrices: list[EditedMatrix] = list(matrices)
        self.config = config
        self.base_model = base_model
        self.training_info: dict[str, Any] = dict(training or {})
        self.source: str | None = None

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def create(cls, kind: str, model: nn.Module, *, layers: Sequence[int] | None = None,
               modules: Sequence[str] | None = None, config: Any = None) -> EditorNetwork:
        """An untrained network of ``kind`` (``"mend"`` or ``"ke"``) for ``model``.

        Args:
            layers: decoder layers whose MLP matrices are edited (default: the last three; see
                :func:`~hf_edit.editors.find_edited_matrices`).
            modules: explicit module names instead.
            config: a :class:`MENDNetworkConfig` / :class:`KENetworkConfig` or a dict of its fields.
        """
        network_class = cls._class_of(kind)
        config_class = network_class.config_class
        if config is None:
            config = config_class()
        elif isinstance(config, Mapping):
            known = {f.name for f in fields(config_class)}
            unknown = set(config) - known
            if unknown:
                raise ConfigError(f"Unknown {kind} network settings {sorted(unknown)}; known: {sorted(known)}.")
            config = config_class(**config)
        elif not isinstance(config, config_class):
            raise ConfigError(f"A {kind} network needs a {config_class.__name__}, got {type(config).__name__}.")
        matrices = find_edited_matrices(model, layers=layers, modules=modules)
        return network_class._build(matrices, config, BaseModelInfo.of(model), model=model)

    @classmethod
    def _build(cls, matrices: list[EditedMatrix], config: Any, base_model: BaseModelInfo,
               model: nn.Module | None = None, training: Mapping[str, Any] | None = None) -> EditorNetwork:
        return cls(matrices, config, base_model, training)

    @classmethod
    def _class_of(cls, kind: str) -> type[EditorNetwork]:
        kind = str(kind).lower()
        if kind not in EditorNetwork._kinds:
            raise ConfigError(f"Unknown editor network kind {kind!r}; known: {sorted(EditorNetwork._kinds)}.")
        return EditorNetwork._kinds[kind]

    def learning_rate_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by an optimiser of their own at ``lr_lr`` (MEND's per-matrix edit learning rates)."""
        return []

    # -- the edit ------------------------------------------------------------------------------------------------
    def matrix(self, name: str) -> EditedMatrix:
        for m in self.matrices:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def layers(self) -> tuple[int, ...]:
        """The decoder layers whose matrices this network edits."""
        return tuple(dict.fromkeys(m.layer for m in self.matrices))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- base model check --------------------------------------------------------------------------------------
    def check_base_model(self, model: nn.Module) -> None:
        """Refuse ``model`` unless its weights are those this network was trained for.

        Raises:
            EditorMismatchError: another model (fingerprint, architecture, vocabulary or a matrix shape differs).
        """
        given = BaseModelInfo.of(model)
        expected = self.base_model
        problems = []
        if given.model_type != expected.model_type:
            problems.append(f"model type {given.model_type!r} instead of {expected.model_type!r}")
        if given.vocab_size != expected.vocab_size:
            problems.append(f"vocabulary of {given.vocab_size} instead of {expected.vocab_size}")
        inner = unwrap_model(model)
        for m in self.matrices:
            try:
                found = find_edited_matrices(inner, modules=[m.name])[0]
            except Exception:  # any lookup failure is a mismatch
                problems.append(f"no module {m.name}")
                continue
            if (found.in_features, found.out_features) != (m.in_features, m.out_features):
                problems.append(f"{m.name} is {found.out_features}x{found.in_features}, not "
                                f"{m.out_features}x{m.in_features}")
        if not problems and given.fingerprint != expected.fingerprint:
            problems.append("its weights differ (weight fingerprint "
                            f"{given.fingerprint[:12]}… instead of {expected.fingerprint[:12]}…)")
            if given.dtype != expected.dtype:
                problems.append(f"it is loaded in {given.dtype}, the editor was trained on {expected.dtype} "
                                "weights")
        if problems:
            name = given.name_or_path or "the given model"
            raise EditorMismatchError(
                f"This {self.kind.upper()} editor network{f' ({self.source})' if self.source else ''} was trained "
                f"for {expected.name_or_path or 'another model'}, not for {name}: {'; '.join(problems)}. An editor "
                "network only edits the model it was trained for; train one for this model with "
                "hf_edit.editors.train_editor (or `hf-edit train-editor`), or pass check_base_model=False to use "
                "it anyway.")

    # -- saving and loading ------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The content of ``editor_config.json``."""
        return {"format": EDITOR_FORMAT, "kind": self.kind, "hf_edit_version": __version__,
                "network": asdict(self.config), "matrices": [m.to_dict() for m in self.matrices],
                "base_model": self.base_model.to_dict(), "training": self.training_info,
                "n_parameters": sum(p.numel() for p in self.parameters())}

    def save_pretrained(self, save_directory: str | os.PathLike, *, repo_id: str | None = None) -> Path:
        """Write ``editor_config.json``, ``editor.safetensors`` and a model card ``README.md`` to the folder."""
        from safetensors.torch import save_file

        from .card import render_editor_card

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.state_dict().items()}
        save_file(state, str(folder / EDITOR_WEIGHTS_NAME), metadata={"format": EDITOR_FORMAT, "kind": self.kind})
        description = self.describe()
        description["weights_sha256"] = _file_sha256(folder / EDITOR_WEIGHTS_NAME)
        (folder / EDITOR_CONFIG_NAME).write_text(json.dumps(description, indent=2, ensure_ascii=False))
        render_editor_card(description, repo_id=repo_id).save(folder / "README.md")
        return folder

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, revision: str | None = None,
                        token: str | bool | None = None, map_location: str | torch.device = "cpu"
                        ) -> EditorNetwork:
        """Load a network written by :meth:`save_pretrained` from a folder or a Hub model repo.

        Raises:
            EditorNetworkError: the folder/repo holds no editor network, or one of another kind than this class.
        """
        from safetensors.torch import load_file

        folder = _resolve_folder(source, revision=revision, token=token)
        try:
            description = json.loads((folder / EDITOR_CONFIG_NAME).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise EditorNetworkError(f"{source} holds no readable {EDITOR_CONFIG_NAME}: {err}") from err
        if description.get("format") != EDITOR_FORMAT:
            raise EditorNetworkError(f"{source} is not an hf_edit editor network (format "
                                     f"{description.get('format')!r}, expected {EDITOR_FORMAT!r}).")
        kind = description.get("kind")
        network_class = cls._class_of(kind) if cls is EditorNetwork else cls
        if network_class.kind != kind:
            raise EditorNetworkError(f"{source} holds a {str(kind).upper()} editor network, not a "
                                     f"{network_class.kind.upper()} one.")
        config = network_class.config_class(**description["network"])
        matrices = [EditedMatrix.from_dict(m) for m in description["matrices"]]
        network = network_class._build(matrices, config, BaseModelInfo.from_dict(description["base_model"]),
                                       training=description.get("training"))
        try:
            state = load_file(str(folder / EDITOR_WEIGHTS_NAME), device="cpu")
        except OSError as err:
            raise EditorNetworkError(f"{source} has no readable {EDITOR_WEIGHTS_NAME}: {err}") from err
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise EditorNetworkError(f"The weights in {source} do not fit its {EDITOR_CONFIG_NAME}: {err}") from err
        network.source = str(source)
        network.weights_sha256 = description.get("weights_sha256")
        return network.to(map_location).eval()

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    commit_message: str | None = None, revision: str | None = None) -> str:
        """Upload the network (config, weights, model card) to a Hub model repo in one commit; the commit URL."""
        from ..hub import push_folder

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, repo_id=repo_id)
            info = push_folder(tmp, repo_id, token=token, private=private, revision=revision,
                               commit_message=commit_message or f"Upload a {self.kind.upper()} editor network "
                                                                "with hf_edit")
        return info.commit_url

    def extra_repr(self) -> str:
        return f"kind={self.kind}, matrices={[m.name for m in self.matrices]}"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _resolve_folder(source: str | os.PathLike, *, revision: str | None, token: str | bool | None) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise EditorNetworkError(f"{source} is a file; pass the folder written by EditorNetwork.save_pretrained.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), revision=revision, token=token,
                                      allow_patterns=[EDITOR_CONFIG_NAME, EDITOR_WEIGHTS_NAME, "README.md"]))
    except Exception as err:  # validation, missing repo, offline: all mean "not found"
        raise EditorNetworkError(f"No editor network at {source!r}: it is not a local folder, and the Hub "
                                 f"answered {type(err).__name__}: {err}") from err


# -- MEND ---------------------------------------------------------------------------------------------------------
class _ResidualLowRank(nn.Module):
    """One block of the reference's IDMLP: h ← h + ReLU(s_m ⊙ (U V h + b) + o_m), U = 0 at init (identity)."""

    def __init__(self, dim: int, rank: int, n_modes: int, generator: torch.Generator) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.zeros(dim, rank))
        self.v = nn.Parameter(torch.randn(rank, dim, generator=generator))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, h: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (h @ self.v.T) @ self.u.T + self.bias
        return h + torch.relu(pre * self.mode_scale[mode] + self.mode_shift[mode])


class GradientTransform(nn.Module):
    """MEND's transform of the factors of one matrix shape: normalise u and δ, run [û; δ̂] through the residual
    blocks, split the result into ũ and δ̃.

    Normalisation statistics (count, mean and sum of squared deviations of u and δ, pooled over every matrix
    sharing the transform) are buffers, saved with the weights.  With fewer than two observed rows the inputs
    pass unnormalised.
    """

    def __init__(self, in_features: int, out_features: int, n_modes: int, config: MENDNetworkConfig,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.norm = config.norm
        dim = in_features + out_features
        rank = min(config.rank, dim)
        self.blocks = nn.ModuleList(_ResidualLowRank(dim, rank, n_modes, generator)
                                    for _ in range(config.n_hidden + 1))
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("u_mean", torch.zeros(in_features))
        self.register_buffer("u_m2", torch.zeros(in_features))
        self.register_buffer("d_mean", torch.zeros(out_features))
        self.register_buffer("d_m2", torch.zeros(out_features))

    # normalisation statistics
    def statistics_size(self) -> int:
        return 1 + 2 * (self.in_features + self.out_features)

    @staticmethod
    def batch_statistics(factors: GradientFactors) -> torch.Tensor:
        """(count, mean u, M2 u, mean δ, M2 δ) of the rows of one factor set, packed in one float32 vector."""
        u, d = factors.inputs.detach().float(), factors.grads.detach().float()
        n = u.shape[0]
        if n == 0:
            return torch.cat([torch.zeros(1, device=u.device), torch.zeros(2 * u.shape[1] + 2 * d.shape[1],
                                                                           device=u.device)])
        mu, md = u.mean(0), d.mean(0)
        return torch.cat([torch.tensor([float(n)], device=u.device), mu, ((u - mu) ** 2).sum(0), md,
                          ((d - md) ** 2).sum(0)])

    def unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        i, o = self.in_features, self.out_features
        return packed[0], packed[1:1 + i], packed[1 + i:1 + 2 * i], packed[1 + 2 * i:1 + 2 * i + o], \
            packed[1 + 2 * i + o:]

    def packed_statistics(self) -> torch.Tensor:
        return torch.cat([self.count[None], self.u_mean, self.u_m2, self.d_mean, self.d_m2])

    @staticmethod
    def merge(a: torch.Tensor, b: torch.Tensor, in_features: int) -> torch.Tensor:
        """Chan et al.'s parallel merge of two packed statistics (the result of Welford over both row sets)."""
        na, nb = a[0], b[0]
        n = na + nb
        if float(nb) == 0:
            return a.clone()
        if float(na) == 0:
            return b.clone()
        out = torch.empty_like(a)
        out[0] = n
        i = in_features
        size = a.shape[0]
        for mean_slice, m2_slice in ((slice(1, 1 + i), slice(1 + i, 1 + 2 * i)),
                                     (slice(1 + 2 * i, 1 + 2 * i + (size - 1 - 2 * i) // 2),
                                      slice(1 + 2 * i + (size - 1 - 2 * i) // 2, size))):
            delta = b[mean_slice] - a[mean_slice]
            out[mean_slice] = a[mean_slice] + delta * (nb / n)
            out[m2_slice] = a[m2_slice] + b[m2_slice] + delta ** 2 * (na * nb / n)
        return out

    @torch.no_grad()
    def update_statistics(self, packed: torch.Tensor) -> None:
        """Merge packed batch statistics into the buffers."""
        merged = self.merge(self.packed_statistics(), packed.to(self.count.device, torch.float32),
                            self.in_features)
        count, u_mean, u_m2, d_mean, d_m2 = self.unpack(merged)
        self.count.copy_(count)
        self.u_mean.copy_(u_mean)
        self.u_m2.copy_(u_m2)
        self.d_mean.copy_(d_mean)
        self.d_m2.copy_(d_m2)

    def normalise(self, u: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u − μ_u)/(σ_u + 1e-7), (δ − μ_δ)/(σ_δ + 1e-7), σ with ddof = 1; unchanged while count < 2."""
        if not self.norm or float(self.count) < 2:
            return u, d
        denominator = self.count - 1
        u_std = (self.u_m2 / denominator).sqrt()
        d_std = (self.d_m2 / denominator).sqrt()
        return (u - self.u_mean) / (u_std + _NORM_EPS), (d - self.d_mean) / (d_std + _NORM_EPS)

    def forward(self, u: torch.Tensor, d: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        u, d = self.normalise(u.float(), d.float())
        h = torch.cat([u, d], dim=-1)
        for block in self.blocks:
            h = block(h, mode)
        return h[:, :self.in_features], h[:, self.in_features:]


class MENDNetwork(EditorNetwork):
    """MEND's editor: ΔW_ℓ = η_ℓ · Δ̃ᵀ Ũ for every edited matrix ℓ (Linear orientation), with
    (Ũ, Δ̃) = transform(U, Δ) the transformed gradient factors and η_ℓ a learned step size.

    The forward pass maps ``{name: GradientFactors}`` to ``{name: (A, B)}`` with A = Ũ (n × in) and
    B = η Δ̃ᵀ (out × n): the exact LoRA factors of the edit.
    """

    kind = "mend"
    joint_edits = True
    collects_statistics = True
    config_class = MENDNetworkConfig

    def __init__(self, matrices: Sequence[EditedMatrix], config: MENDNetworkConfig, base_model: BaseModelInfo,
                 training: Mapping[str, Any] | None = None) -> None:
        super().__init__(matrices, config, base_model, training)
        generator = torch.Generator().manual_seed(config.seed)
        groups: dict[str, list[EditedMatrix]] = {}
        for m in self.matrices:
            groups.setdefault(self._group_key(m), []).append(m)
        self.modes = {m.name: group.index(m) for group in groups.values() for m in group}
        self.transforms = nn.ModuleDict({
            _safe_key(key): GradientTransform(group[0].in_features, group[0].out_features, len(group), config,
                                              generator)
            for key, group in groups.items()})
        self.edit_lrs = nn.Parameter(torch.full((len(self.matrices),), float(config.edit_lr)))

    def _group_key(self, matrix: EditedMatrix) -> str:
        return matrix.shape_key if self.config.shared else matrix.name

    def transform_of(self, name: str) -> GradientTransform:
        return self.transforms[_safe_key(self._group_key(self.matrix(name)))]

    def forward(self, factors: Mapping[str, GradientFactors], scale: float = 1.0
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The edit's factors ``{name: (A, B)}`` (ΔW = B A) for every matrix present in ``factors``."""
        out = {}
        for index, m in enumerate(self.matrices):
            if m.name not in factors:
                continue
            f = factors[m.name]
            device = self.edit_lrs.device
            u_tilde, d_tilde = self.transform_of(m.name)(f.inputs.to(device), f.grads.to(device), self.modes[m.name])
            out[m.name] = (u_tilde, (self.edit_lrs[index] * scale) * d_tilde.T)
        return out

    @torch.no_grad()
    def statistics_of(self, factors: Mapping[str, GradientFactors]) -> dict[str, torch.Tensor]:
        """Packed batch statistics per transform for ``factors`` (matrices of one transform pooled, in order)."""
        out: dict[str, torch.Tensor] = {}
        for m in self.matrices:
            if m.name not in factors:
                continue
            key = _safe_key(self._group_key(m))
            packed = GradientTransform.batch_statistics(factors[m.name])
            out[key] = packed if key not in out else GradientTransform.merge(out[key], packed, m.in_features)
        return out

    def learning_rate_parameters(self) -> list[nn.Parameter]:
        return [self.edit_lrs]

    @torch.no_grad()
    def observe(self, factors: Mapping[str, GradientFactors]) -> None:
        """Update the normalisation statistics with the rows of ``factors``."""
        for key, packed in self.statistics_of(factors).items():
            self.transforms[key].update_statistics(packed)

    def statistics_vector_size(self) -> int:
        return sum(t.statistics_size() for t in self.transforms.values())


def _safe_key(key: str) -> str:
    return key.replace(".", "_")


# -- KE -----------------------------------------------------------------------------------------------------------
class _Conditioner(nn.Module):
    """The reference's ``LSTMConditioner``: token embedding (initialised from the base model's), one-layer
    bidirectional LSTM over the unpadded tokens, both final states concatenated, Linear + tanh."""

    def __init__(self, embedding: torch.Tensor, lstm_hidden: int, condition_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(embedding.shape[0], embedding.shape[1])
        with torch.no_grad():
            self.embedding.weight.copy_(embedding)
        self.lstm = nn.LSTM(embedding.shape[1], lstm_hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * lstm_hidden, condition_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        lengths = attention_mask.sum(-1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embedding(input_ids), lengths, batch_first=True,
                                                   enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        return torch.tanh(self.out(torch.cat([h_n[0], h_n[1]], dim=-1)))


class _ConditionedParameter(nn.Module):
    """One matrix's head: weight_norm(Linear) → tanh → weight_norm(Linear) with 2(in + out) + 1 outputs."""

    def __init__(self, matrix: EditedMatrix, condition_dim: int, hidden_dim: int) -> None:
        super().__init__()
        weight_norm = nn.utils.parametrizations.weight_norm
        self.in_features, self.out_features = matrix.in_features, matrix.out_features
        self.fc1 = weight_norm(nn.Linear(condition_dim, hidden_dim))
        self.fc2 = weight_norm(nn.Linear(hidden_dim, 2 * (matrix.in_features + matrix.out_features) + 1))

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(condition)))


def ke_factors(raw: torch.Tensor, factors: GradientFactors, in_features: int, out_features: int,
               max_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KE's edit of one matrix from the head's raw output (length 2(in + out) + 1), as LoRA factors.

    The output splits, in the reference's order, into ``cola`` (out), ``rowa`` (in), ``colb`` (out), ``rowb``
    (in) and η; with α = softmax(rowa), γ = softmax(rowb) and s = max_scale · sigmoid(η) (spec §2.2, §2.6):

        ΔW = s (Σ_t (cola ⊙ g_t)(α ⊙ x_t)ᵀ + colb γᵀ),   A = [α ⊙ x_t; γᵀ],  B = s [cola ⊙ g_t, colb].
    """
    o, i = out_features, in_features
    cola, rowa, colb, rowb, eta = raw[:o], raw[o:o + i], raw[o + i:2 * o + i], raw[2 * o + i:2 * (o + i)], raw[-1]
    alpha, gamma = torch.softmax(rowa, -1), torch.softmax(rowb, -1)
    scale = max_scale * torch.sigmoid(eta)
    device = raw.device
    A = torch.cat([factors.inputs.to(device) * alpha, gamma[None]], dim=0)
    B = scale * torch.cat([(factors.grads.to(device) * cola).T, colb[:, None]], dim=1)
    return A, B


class KENetwork(EditorNetwork):
    """KE's editor: a condition c = encoder(edit sentence) and, per matrix, a head that turns c into a mask of
    the gradient and an offset (:func:`ke_factors`); ΔW has rank T + 1.

    The forward pass takes the factors of **one** edit and its condition tokens (batch 1, as the reference
    requires) and returns ``{name: (A, B)}``.
    """

    kind = "ke"
    config_class = KENetworkConfig

    def __init__(self, matrices: Sequence[EditedMatrix], config: KENetworkConfig, base_model: BaseModelInfo,
                 training: Mapping[str, Any] | None = None, embedding: torch.Tensor | None = None) -> None:
        super().__init__(matrices, config, base_model, training)
        if embedding is None:  # weights come from a checkpoint; the shape must be right
            embedding = torch.zeros(base_model.vocab_size, base_model.embedding_dim)
        with _SeededInit(config.seed):
            self.conditioner = _Conditioner(embedding.float(), config.lstm_hidden, config.condition_dim)
            self.heads = nn.ModuleDict({_safe_key(m.name): _ConditionedParameter(m, config.condition_dim,
                                                                                 config.hidden_dim)
                                        for m in self.matrices})

    @classmethod
    def _build(cls, matrices, config, base_model, model=None, training=None) -> KENetwork:
        embedding = None
        if model is not None:
            embedding = unwrap_model(model).get_input_embeddings().weight.detach().float().cpu().clone()
        return cls(matrices, config, base_model, training, embedding=embedding)

    def condition(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The condition vector(s) of the edit sentence(s), (batch, condition_dim)."""
        return self.conditioner(input_ids.to(self.device), attention_mask.to(self.device))

    def forward(self, factors: Mapping[str, GradientFactors] | Sequence[Mapping[str, GradientFactors]],
                input_ids: torch.Tensor, attention_mask: torch.Tensor, scale: float = 1.0
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The edit's factors ``{name: (A, B)}``.

        Args:
            factors: the gradient factors of one edit (then ``input_ids`` holds its one condition sequence), or a
                list of n edits' factors, each computed alone, with n condition sequences: their updates are added
                (factors concatenated, ranks adding up).
            input_ids, attention_mask: the condition tokens (the edit sentence: prompt + target), right-padded.
            scale: multiplies the update.

        Raises:
            ConfigError: the number of condition sequences differs from the number of edits (the reference's
                batch guard: one edit is conditioned on its own sentence only).
        """
        edits = [factors] if isinstance(factors, Mapping) else list(factors)
        if input_ids.shape[0] != len(edits):
            raise ConfigError(f"KE conditions each edit on its own sentence: got {input_ids.shape[0]} condition "
                              f"sequences for {len(edits)} edit(s).")
        conditions = self.condition(input_ids, attention_mask)
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for m in self.matrices:
            head = self.heads[_safe_key(m.name)]
            parts = [ke_factors(head(conditions[i]), edit[m.name], m.in_features, m.out_features,
                                self.config.max_scale) for i, edit in enumerate(edits) if m.name in edit]
            if parts:
                out[m.name] = (torch.cat([a for a, _ in parts], 0), torch.cat([b for _, b in parts], 1) * scale)
        return out


class _SeededInit:
    """Seed torch's global generator inside the block and restore its state afterwards (module init uses it)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        torch.random.set_rng_state(self.state)

"""A third-party editing method, written outside hf_edit against its plugin contract.

"Output shift" is a deliberately small method: for each request it adds a rank-one update to the MLP output
projection of the configured layer(s) so that, at the last token of the filled prompt, the projection's output
moves by ``scale`` along the output embedding of the target's first token:

    k = input of the projection at the prompt's last token (the key),
    A = kᵀ / (k · k)            (1 × in_features),
    B = scale · e_t / ‖e_t‖     (out_features × 1),  e_t = row t of the output embedding,

so that (W + B A) k = W k + scale · e_t / ‖e_t‖.  It is not a good editor (no generalisation control, no locality
term) but it is a complete one: it validates requests, computes exact factors, and everything else (adapters,
saving, loading with plain peft, removing, the CLI, evaluation, model cards) comes from hf_edit.

Use it in Python after importing this module (``register_method`` runs at import)::

    import custom_method  # registers "output-shift"
    model = EditedModel.from_pretrained("gpt2", edits=[request], method="output-shift")

or install it as a package with an entry point, so that ``EditedModel.from_pretrained(folder)`` and ``hf-edit``
find it in a fresh process::

    [project.entry-points."hf_edit.methods"]
    output-shift = "custom_method"
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from hf_edit.architecture import base_layer, unwrap_model
from hf_edit.errors import ConfigError, InvalidRequestError
from hf_edit.hooks import capture, frozen_eval
from hf_edit.methods import EditConfig, Editor, Update, register_method
from hf_edit.requests import EditRequest
from hf_edit.tokens import target_ids


@dataclass(frozen=True)
class OutputShiftConfig(EditConfig):
    """Hyperparameters of the output-shift method.

    Args:
        scale: length of the shift added to the projection's output at the prompt's last token.
    """

    method: ClassVar[str] = "output-shift"
    label: ClassVar[str] = "Output shift"
    description: ClassVar[str] = ("A rank-one shift of an MLP output projection along the target's output embedding "
                                  "(an example plugin).")

    scale: float = 20.0

    def validate(self) -> None:
        if not self.scale > 0:
            raise ConfigError(f"scale must be positive, got {self.scale}.")


class OutputShiftEditor(Editor):
    """Computes output-shift updates, one request after another."""

    config_class = OutputShiftConfig
    joint = False

    def validate(self, request: EditRequest) -> None:
        super().validate(request)  # the target tokenises, the layers exist
        if not self.tokenizer(request.filled_prompt)["input_ids"]:
            raise InvalidRequestError(f"The prompt {request.filled_prompt!r} tokenises to nothing.")

    def compute(self, requests: Sequence[EditRequest]) -> list[Update]:
        updates = []
        model = unwrap_model(self.model)
        embedding = model.get_output_embeddings().weight
        for request in requests:
            ids = torch.tensor([self.tokenizer(request.filled_prompt)["input_ids"]])
            target = target_ids(self.tokenizer, request.target_new)[0]
            direction = embedding[target].detach().float().cpu()
            direction = direction / direction.norm()
            for edit_target in self.targets():
                module = model.get_submodule(edit_target.name)
                with frozen_eval(self.model), torch.no_grad(), capture(module, tuple(ids.shape)) as seen:
                    self.model(input_ids=ids.to(base_layer(module).weight.device))
                key = seen.inputs[0, -1].float().cpu()
                updates.append(Update(module=edit_target.name, A=(key / key.dot(key))[None],
                                      B=self.config.scale * direction[:, None], requests=(request,),
                                      layer=edit_target.layer, info={"key_norm": key.norm().item()}))
        return updates


register_method(OutputShiftConfig, OutputShiftEditor)

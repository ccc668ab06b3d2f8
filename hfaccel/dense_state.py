"""The state_dict side of hfaccel's Linear replacements (PackedLinear, CodedLinear): checkpoints see `weight`."""

from __future__ import annotations

import torch


class DenseWeightState:
    """state_dict() / load_state_dict() for a Linear replacement that holds its weight in another form: `weight`
    (a property giving the dense [out, in] tensor) and `bias` under the usual keys; loading a weight calls
    `_load_weight(key, tensor, error_msgs)`, which re-encodes it or appends an error."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            self._load_weight(key, state_dict[key], error_msgs)
        elif strict:
            missing_keys.append(key)
        if self.bias is not None:
            bkey = prefix + "bias"
            if bkey in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bkey])
            elif strict:
                missing_keys.append(bkey)

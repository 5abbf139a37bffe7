"""The alignment head: the math and nothing else.

For the final hidden state `h_t` (the input of the model's unembedding `W_U`, shape `(..., d)`), the head proposes a
hidden-space offset

    u_t     = W_read h_t                                   (..., r)     read into the alignment subspace
    pi_t    = softmax(W_route u_t + b_route)               (..., K)     which intervention acts at this token
    v_t^k   = SiLU(A_k u_t + b_k),  k = 1..K               (..., K, r)  each intervention head's proposal
    delta_t = W_write sum_k pi_t^k v_t^k                   (..., d)

and the alignment vector is read out through the base model's own frozen unembedding:

    a_t = s * W_U delta_t                                  (..., V)

(`s` is the model's logit scale, see `iav_trl.tuners.iav.readout`). `W_write` starts at zero, so a fresh head has
`a_t == 0` and reproduces the base model exactly; training moves it away from zero.

Why a hidden-space offset: `z_base + alpha * a_t = s * (W_U (h_t + alpha * delta_t) + b)`, so decoding needs ONE
vocabulary projection, the same as the base model. A head with its own `d x V` projection costs a second one
(measured in `benchmarks/decode_speed.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AlignmentHead(nn.Module):
    """Maps final hidden states `(..., d)` to hidden-space alignment offsets `delta` `(..., d)`."""

    def __init__(self, hidden_size: int, num_interventions: int, intervention_dim: int, dropout: float = 0.0):
        super().__init__()
        self.num_interventions = num_interventions
        self.intervention_dim = intervention_dim
        self.read = nn.Linear(hidden_size, intervention_dim, bias=False)
        self.route = nn.Linear(intervention_dim, num_interventions)
        # The K proposals A_k u + b_k computed as one (r -> K*r) projection.
        self.propose = nn.Linear(intervention_dim, num_interventions * intervention_dim)
        self.write = nn.Linear(intervention_dim, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.write.weight)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        u = self.dropout(self.read(hidden_states))  # (..., r)
        routing = torch.softmax(self.route(u), dim=-1)  # (..., K)
        proposals = F.silu(self.propose(u)).unflatten(-1, (self.num_interventions, self.intervention_dim))
        mixed = (routing.unsqueeze(-1) * proposals).sum(dim=-2)  # (..., r)
        return self.write(mixed)

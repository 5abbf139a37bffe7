"""Plain-PyTorch references for the tests, written from the documented formulas, independent of iav_trl's code."""

import torch
import torch.nn.functional as F


def randomize_heads(model, seed: int = 0, std: float = 0.5) -> None:
    """Give every alignment head non-zero weights (a fresh head has W_write = 0, so a_t = 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.alignment_heads.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def reference_alignment(head, hidden, unembedding, scale=1.0):
    """a_t = s * W_U W_write sum_k softmax(W_route u + b)_k SiLU(A_k u + b_k), u = W_read h."""
    u = hidden @ head.read.weight.T
    routing = torch.softmax(u @ head.route.weight.T + head.route.bias, dim=-1)
    proposals = F.silu(u @ head.propose.weight.T + head.propose.bias)
    proposals = proposals.view(*u.shape[:-1], head.num_interventions, head.intervention_dim)
    mixed = (routing.unsqueeze(-1) * proposals).sum(-2)
    return scale * (mixed @ head.write.weight.T) @ unembedding.T

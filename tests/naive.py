"""Naive dense formulas, written straight from the definitions: the tests' gold standard.

They materialise everything ([T, E, r] for LoRA, full log-softmaxes for KD) and work in any
dtype, so the same code gives the float64 gold and the "naive torch in the same dtype" bound.
"""
import torch


def routed_lora(x, weight, bias, modality, lora_a, lora_b, router_weight, experts_per_modality, scaling,
                lora_input=None):
    """y [..., N] for x [..., K], computed densely over all experts with masked softmax gates."""
    u = x if lora_input is None else lora_input
    k = x.shape[-1]
    xs, us, ids = x.reshape(-1, k), u.reshape(-1, k), modality.reshape(-1).long()
    owner = torch.repeat_interleave(torch.arange(len(experts_per_modality)),
                                    torch.tensor(experts_per_modality)).to(x.device)  # [E] modality of each expert
    own = owner.unsqueeze(0) == ids.unsqueeze(1)                                      # [T, E]
    if router_weight is None:
        logits = torch.zeros(xs.shape[0], owner.shape[0], dtype=x.dtype, device=x.device)
    else:
        logits = us @ router_weight.t()
    softmax_dtype = torch.promote_types(logits.dtype, torch.float32)  # the spec: gates in float32 (or wider)
    gates = torch.softmax(logits.to(softmax_dtype).masked_fill(~own, float("-inf")), dim=-1).to(x.dtype)
    h = torch.einsum("tk,erk->ter", us, lora_a)
    y = xs @ weight.t() + scaling * torch.einsum("te,ter,enr->tn", gates, h, lora_b)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def reduce_positions(per_pos, mask, reduction):
    """Per-position losses zeroed where mask is False, then "none", "sum", or "mean" over the masked-in ones."""
    per_pos = per_pos if mask is None else torch.where(mask, per_pos, torch.zeros_like(per_pos))
    count = max(int(per_pos.numel() if mask is None else mask.sum()), 1)
    return {"none": per_pos, "sum": per_pos.sum(), "mean": per_pos.sum() / count}[reduction]


def kd_kl(student, teacher, temperature=1.0, mask=None, vocab_range=None, topk=None, reduction="mean"):
    """T^2 KL(softmax(t/T) || softmax(s/T)) per position over a vocab slice, then reduced."""
    if vocab_range is not None:
        student, teacher = student[..., vocab_range[0]:vocab_range[1]], teacher[..., vocab_range[0]:vocab_range[1]]
    if topk is not None:
        teacher, idx = teacher.topk(topk, dim=-1)
        student = student.gather(-1, idx)
    teacher = teacher.masked_fill(teacher <= torch.finfo(teacher.dtype).min, float("-inf"))  # masked entries
    log_ps = torch.log_softmax(student / temperature, dim=-1)
    log_pt = torch.log_softmax(teacher / temperature, dim=-1)
    pt = log_pt.exp()
    per_pos = temperature ** 2 * torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt)).sum(-1)
    return reduce_positions(per_pos, mask, reduction)


def fused_linear_kd_kl(student_hidden, teacher_hidden, weight, teacher_weight=None, **kd_options):
    """kd_kl on both output projections' logits, materialised; the teacher a constant."""
    teacher = (teacher_hidden @ (weight if teacher_weight is None else teacher_weight).t()).detach()
    return kd_kl(student_hidden @ weight.t(), teacher, **kd_options)


def kd_kl_given(student_hidden, weight, indices, teacher_logits, temperature=1.0, mask=None, reduction="mean",
                teacher_logsumexp=None):
    """The top-k loss with the teacher given as ids [..., k] and logits [..., k]: the student's logits gathered at
    the ids, both renormalised on them; with teacher_logsumexp (over the slice, at T) the tail bucket: the mass
    outside the k is one more outcome of both (the student's from its whole vocabulary slice = the ids' range is
    not known here: the caller passes weight cut to the slice and ids relative to it)."""
    student = student_hidden @ weight.t()
    t = teacher_logits.to(student.dtype)
    t = t.masked_fill(teacher_logits <= torch.finfo(teacher_logits.dtype).min, float("-inf"))
    s_k = student.gather(-1, indices.long())
    if teacher_logsumexp is None:
        log_ps, log_pt = torch.log_softmax(s_k / temperature, -1), torch.log_softmax(t / temperature, -1)
        pt = log_pt.exp()
        per_pos = temperature ** 2 * torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt)).sum(-1)
    else:
        log_p = s_k / temperature - torch.logsumexp(student / temperature, -1, keepdim=True)
        log_q = t / temperature - teacher_logsumexp.to(student.dtype).unsqueeze(-1)
        q, p_rest = log_q.exp(), 1 - log_p.exp().sum(-1)
        q_rest = (1 - q.sum(-1)).clamp(min=0)
        inside = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)
        rest = torch.where(q_rest > 1e-12, q_rest * (q_rest.clamp(min=1e-300).log() - p_rest.log()),
                           torch.zeros_like(q_rest))
        per_pos = temperature ** 2 * (inside + rest)
    dead = ~(t > float("-inf")).any(-1)
    per_pos = torch.where(dead, torch.zeros_like(per_pos), per_pos)
    return reduce_positions(per_pos, mask, reduction)

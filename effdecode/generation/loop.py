"""The decode loop: one loop for every mode.

In a step every live row feeds ``1 + d_r`` tokens: ``d_r`` drafts (a draft model or n-gram lookup), forced
thinking text or a DEER probe; plain decoding is ``d_r = 0``. A step::

    plan     participants propose each row's inputs (drafter, thinking controller); the KV compressor
             compacts rows at their limit first
    forward  one target forward over the rows (TargetModel.forward, the only call site)
    accept   one token per row (plain), or verification of the drafts (greedy / lossless rejection sampling)
    update   append; cut runs at thinking markers, EOS and stop criteria; participants react (draft schedule,
             thinking spans and probes, eviction bookkeeping); one device-to-host copy decides who stays
    shrink   finished rows leave ``rows``; their KV stays where it is and costs nothing
    admit    (``DecodeConfig.max_slots``) waiting requests take the freed slots: one prefill forward over
             them; their first tokens join the step's emission, and they join ``rows``

Participants live in their own modules: :mod:`~effdecode.generation.drafting`,
:mod:`~effdecode.generation.thinking` (+ :mod:`~effdecode.generation.probes`),
:mod:`~effdecode.generation.compressing`, :mod:`~effdecode.generation.stopping`; per-slot state in
:mod:`~effdecode.generation.state`, the forward in :mod:`~effdecode.generation.target`.
"""

from __future__ import annotations

import time

import torch

from effdecode.generation.output import EffdecodeGenerateOutput
from effdecode.generation.request import GenerationRequest
from effdecode.generation.step import DecodeCall


def run_generation(
    model: torch.nn.Module, request: GenerationRequest
) -> torch.Tensor | EffdecodeGenerateOutput:
    """Decode ``request`` with ``model`` and return what transformers' ``generate`` would.

    Returns
    -------
    torch.Tensor or EffdecodeGenerateOutput
        int64 ``[B, T0 + new]``: the prompts as given and the new tokens, ``pad_token_id`` after a row
        finished; or, with ``return_dict_in_generate``, that plus scores/logits and ``stats``.
    """
    started = time.perf_counter()
    call = DecodeCall(model, request, started)
    with call.routing(), torch.inference_mode():
        emission = call.prefill()
        while True:
            stay, done = call.update(emission)  # append, cut, participants react; the step's host copy
            if done or call.stop.out_of_time():
                break
            call.shrink(stay)
            fresh = call.admit()  # waiting requests into freed slots (max_slots): prefilled together
            emission = None
            if call.state.num_rows:
                plan = call.plan()
                logits = call.forward(plan)
                emission = call.accept(plan, logits)
            emission = call.join(emission, fresh)  # the admitted rows' first tokens join the step's
    return call.finish(started)

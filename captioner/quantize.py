"""int8 copies of a decoder for measuring (dynamic quantization of its Linear and LSTM layers).

Not on the default path: dynamic quantization scales activations per batch, so one photo's
caption can change with the photos batched beside it (26 of 256 Flickr8k dev captions
differed between batches of 32 and one photo at a time; none with float weights), for about
5% of the folder pipeline's time (see the model card). Kept so that ``tools/tune_decoding.py --int8`` and
``benchmarks/bench_search.py --int8`` can measure it again.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from captioner.errors import CaptionerError


def int8_decoder(decoder: nn.Module) -> nn.Module:
    """A copy of ``decoder`` whose Linear and LSTM layers run with int8 weights on the CPU.

    Raises:
        CaptionerError: this torch has no dynamic quantization (torch.ao.quantization).
    """
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as e:
        raise CaptionerError("this torch has no dynamic quantization (torch.ao.quantization)") from e
    with warnings.catch_warnings():
        # torch's notices that these APIs move to torchao: nothing a user of captioner can act on
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecated", category=UserWarning)
        return quantize_dynamic(copy.deepcopy(decoder).cpu(), {nn.Linear, nn.LSTMCell}, dtype=torch.qint8).eval()

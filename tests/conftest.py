"""Suite-wide settings: one torch thread (the test models are small; on a 2-core machine extra
threads cost more in synchronisation than they gain, and subprocess tests would oversubscribe)."""
from __future__ import annotations

import torch

torch.set_num_threads(1)

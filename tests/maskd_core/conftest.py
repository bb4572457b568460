"""The core's tests are small and CPU-bound; one thread keeps them fair to a shared machine."""

import torch

torch.set_num_threads(1)

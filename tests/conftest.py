import torch

# Tests use tiny tensors: one thread avoids oversubscription when other work shares the cores.
torch.set_num_threads(1)

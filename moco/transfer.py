"""Host-to-device copies that never make the host wait for the GPU: one batch (`to_device`), and many small
per-batch tables packed into one transfer (`upload`)."""
import torch

ALIGN = 16  # bytes between the tensors packed by `upload`: any dtype's view of a slice stays aligned


def upload(tensors, device):
    """The CPU `tensors` on `device`, by one copy: packed into one byte buffer (pinned for a GPU), copied
    without blocking the host, and viewed back with their dtypes and shapes. Small per-batch tables
    (crop boxes, indices, colour factors, blur kernels) copied one by one from pageable memory would
    each make the host wait for the GPU."""
    device = torch.device(device)
    tensors = [t.detach().contiguous() for t in tensors]
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    on_gpu = device.type == "cuda"
    packed = torch.empty(max(total, ALIGN), dtype=torch.uint8, pin_memory=on_gpu)
    for t, start in zip(tensors, offsets):
        if t.numel():
            packed[start:start + t.numel() * t.element_size()].copy_(t.reshape(-1).view(torch.uint8))
    packed = packed.to(device, non_blocking=True)
    out = []
    for t, start in zip(tensors, offsets):
        nbytes = t.numel() * t.element_size()
        out.append(packed[start:start + nbytes].view(t.dtype).view(t.shape))
    return out


def to_device(images, device, channels_last=False):
    """Copy a batch to the device without blocking the host, NHWC when asked. A CPU tensor bound for a
    GPU is pinned first: from pageable memory the copy waits for the host to stage it."""
    device = torch.device(device)
    if device.type == "cuda" and images.device.type == "cpu" and not images.is_pinned():
        images = images.pin_memory()
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images

"""A MoCo pre-training checkpoint's query encoder as the weights of a plain torchvision classifier, as
the linear-classification protocol uses it (He et al. 2019, Sec. 4.1): main_lincls.py --pretrained and
the torch.hub entries of hubconf.py both map it this way."""
from moco.checkpoint import checkpoint_state_dict, first_nonfinite
from moco.errors import UserError

FC_KEYS = {"fc.weight", "fc.bias"}  # the classifier that linear classification trains: not taken over


def backbone_from_moco(checkpoint, path):
    """The query encoder's weights without its fc head, with plain torchvision names."""
    state_dict = checkpoint_state_dict(checkpoint, path, what="--pretrained checkpoint")
    backbone = {}
    for key, value in state_dict.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name.startswith("encoder_q.") and not name.startswith("encoder_q.fc"):
            backbone[name[len("encoder_q."):]] = value
    if not backbone:
        raise UserError(f"--pretrained checkpoint '{path}' is not a MoCo pre-training checkpoint "
                        f"(it has no module.encoder_q.* weights)")
    bad = first_nonfinite(backbone.items())
    if bad is not None:  # its features would be NaN: every accuracy measured on them is meaningless
        raise UserError(f"--pretrained checkpoint '{path}' holds non-finite weights ('{bad}' has NaN or inf "
                        f"values); use an earlier checkpoint of the pre-training run")
    return backbone

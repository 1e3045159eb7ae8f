"""Image-class and image-caption data, as plain sequences of `Sample`.

Every vlens experiment reads data the same way: an indexable sequence of
`Sample` records (a `Dataset`, or any list of them). Loaders for HF
`datasets`, image folders, ShareGPT4V-style caption JSON and the toy
generator all return a `Dataset`.

    >>> from vlens.data import Sample, ListDataset
    >>> from PIL import Image
    >>> ListDataset([Sample(Image.new("RGB", (8, 8)), label=0)], class_names=["black"]).class_names
    ['black']
"""

from ..errors import BadImageError
from ..prepare import load_image
from .loaders import IMAGE_EXTENSIONS, HFDataset, from_hf, hf_captions, image_folder, imagenet_class_names, sharegpt4v
from .records import Dataset, ListDataset, Sample, vocabulary

__all__ = [
    "Sample", "Dataset", "ListDataset", "BadImageError", "load_image", "IMAGE_EXTENSIONS", "HFDataset", "from_hf",
    "hf_captions", "image_folder", "imagenet_class_names", "sharegpt4v", "toy", "vocabulary",
]


def toy(split: str = "train", n: int = 500, seed: int = 0) -> Dataset:
    """The generated toy data set of `vlens.toy` (coloured shapes; 20 classes; captions).

    Example:
        >>> ds = toy("heldout", n=4)
        >>> ds.class_names[ds[1].label], ds[1].caption.split()[2:4]
        ('red square', ['red', 'square'])
    """
    from ..toy.data import toy_dataset

    return toy_dataset(split, n=n, seed=seed)

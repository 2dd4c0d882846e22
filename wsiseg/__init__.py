"""wsiseg: nucleus segmentation and classification for H&E whole-slide images."""

from .slide import MppUnknownError, Slide, SlideError, open_slide

__version__ = "0.1.0"
__all__ = ["MppUnknownError", "Slide", "SlideError", "open_slide", "__version__"]

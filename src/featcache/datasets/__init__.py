"""How inputs are read: image decoding, COCO panoptic, SA-1B, ScanNet exports, camera geometry,
and the safe unpacking of downloaded archives."""

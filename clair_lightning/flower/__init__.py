"""Flower layer: the same clients and the same CLAIR round on Flower (simulation or deployment).

Optional (``pip install clair-lightning[flower]``); it sits beside the Lightning layer over the
same core and imports downwards only. Nothing below it imports ``flwr``.
"""

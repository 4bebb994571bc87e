"""The cine segmenter: network, training pieces and the labeller used by preprocessing."""

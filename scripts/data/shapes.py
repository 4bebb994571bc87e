"""The shape of a prepared or generated cine clip (1 x NUM_FRAMES x IMAGE_SIZE x IMAGE_SIZE), for every stage to
import without pulling preprocessing in."""

NUM_FRAMES = 50
IMAGE_SIZE = 96

"""Band-gap data: readers, validation, splits and the graph cache."""

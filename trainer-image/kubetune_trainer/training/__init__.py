"""What every recipe shares around its loop: processes and devices, staged inputs, early
stopping and publishing the results."""

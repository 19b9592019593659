"""What a job shows people about itself: report.html (the before → after table, curves, gallery
and config), built from the files the job writes to output.uri. Torch-free, so `kubetune report`
builds it anywhere."""

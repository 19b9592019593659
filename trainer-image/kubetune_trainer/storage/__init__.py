"""Where bytes live: object stores (S3, local folders), staging into the node-local cache, and
checkpoints that count only once their manifest is written."""

"""The model families behind one interface (`base`), chosen by `registry`."""

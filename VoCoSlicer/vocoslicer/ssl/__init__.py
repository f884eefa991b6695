"""Self-supervised objectives: VoCo crops/labels/losses (:mod:`vocoslicer.ssl.voco`), PUMIT losses and masking."""

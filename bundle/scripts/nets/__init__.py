"""Networks: the TUMSyn synthesis network, its encoders, text guidance, LIIF decoder and the BMLIP text model."""

"""RFID: reader payloads -> EPC decode -> presence state machine -> inventory deltas (+ EPCIS)."""

"""Operations: health, readiness, metrics, the model list, stored records, the playground and offline docs."""

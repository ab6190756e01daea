from .tumsyn_synthesis import TUMSynSynthesis

__all__ = ["TUMSynSynthesis"]

"""oddeye: anomaly detection on live camera streams and Kafka topics of frames."""

__version__ = "0.1.0"

"""fedrelay's relay layer: envelopes, tensor codec, chunking, topology, transports, workflows.

Nothing here imports pika outside ``relay.transport.amqp``; nothing here trains a model.
"""

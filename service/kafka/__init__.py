"""The Kafka side of the aiokafka runner, in small layers.

- :mod:`service.kafka.clients`: the consumer and dead-letter producer made from the settings,
  and the errors Kafka gives at start translated into what to fix.
- :mod:`service.kafka.record_guard`: the error policy below the consumer: a record batch or
  record the client cannot read becomes a marker record (then a dead letter), not a crash.
- :mod:`service.kafka.pausing`: backpressure: the bytes bound, pausing the assignment, seeking
  back what was not taken.
- :mod:`service.kafka.checkpoint`: what may be committed (``offset + 1`` of what was written),
  committing it, consumer lag.
- :mod:`service.kafka.stages`: the prepare -> encode -> write stages joined by bounded queues.
- :mod:`service.kafka.pipeline`: the fetch loop that joins them, stopping, and rebalances.
"""

//! Warren's compute node: the AMQP 0-9-1 server, routing and the queue engine.

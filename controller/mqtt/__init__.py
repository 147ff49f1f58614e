"""The MQTT 5 transport of a fleet (docs/fleet.md): nodes that connect out to a broker
(Eclipse Mosquitto is the reference) and controllers that reach them through it.

- :mod:`.options`: broker credentials, TLS and the topic prefix (one :class:`MqttOptions`);
- :mod:`.topics`: the topic names, built and parsed in one place;
- :mod:`.connection`: a configured paho-mqtt 2.x client (MQTT 5, TCP_NODELAY, backoff,
  bounded queues), a bounded blocking connect and :class:`BrokerError`;
- :mod:`.packing`: PUBLISH properties packed once, for the per-message path;
- :mod:`.loop_driver`: a paho client run by an asyncio loop instead of paho's thread;
- :mod:`.node`: :class:`MqttNode`, the device side: a server's core answering requests from
  the broker (status, discover document, states and events on the node's topics);
- :mod:`.broker_link`: :class:`BrokerLink`, a controller's one connection to a broker (reply
  topic, Correlation Data routing, node status with a barrier, subscriptions);
- :mod:`.client`: :class:`MqttClient`, the ``Client`` API for one node over a broker link;
- :mod:`.fleet`: :class:`FleetWatch`, the fleet from the broker's retained topics
  (``statelink fleet``).
"""

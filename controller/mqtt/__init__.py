"""The MQTT 5 transport of a fleet (docs/fleet.md): nodes that connect out to a broker
(Eclipse Mosquitto is the reference) and controllers that reach them through it.

- :mod:`.options`: broker credentials, TLS and the topic prefix (one :class:`MqttOptions`);
- :mod:`.topics`: the topic names, built and parsed in one place;
- :mod:`.connection`: a configured paho-mqtt 2.x client (MQTT 5, TCP_NODELAY, backoff) and a
  bounded blocking connect.
"""

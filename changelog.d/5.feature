A benchmark (`scripts-dev/bench/run`) compares stock Synapse with the module on big-room joins and resident serving, and `scripts-dev/demo` shows a timed join of a 10,000-member room.

The module loads into Synapse 1.163 and adds MSC2775 essentials (heroes, power-level users, bans, kicks, invites, knocks, one member per server) and a room summary to partial `/send_join` answers.

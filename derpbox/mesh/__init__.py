"""The DERP mesh, outbound: derpbox dials its region's other nodes as derper does (spec 1.10)."""

#!/usr/bin/env python3
"""A real SMTP server for the test suite (aiosmtpd), keeping every mail it accepts.

    smtp-sink.py PORT DIR

Each accepted message is written to DIR/NNNNNN.eml (written aside, then renamed, so a
reader never sees half a mail). While DIR/hold exists the server keeps the client waiting
at RCPT TO (it writes DIR/holding meanwhile): a test can stop a sender in the middle of
a conversation. Prints "ready" once it listens.
"""
import asyncio
import os
import sys

from aiosmtpd.controller import Controller


class Sink:
    def __init__(self, folder):
        self.folder = folder

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        hold = os.path.join(self.folder, "hold")
        if os.path.exists(hold):
            open(os.path.join(self.folder, "holding"), "w").close()
            while os.path.exists(hold):
                await asyncio.sleep(0.05)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        count = len([n for n in os.listdir(self.folder) if n.endswith(".eml")])
        name = os.path.join(self.folder, "%06d.eml" % count)
        with open(name + ".tmp", "wb") as f:
            f.write(b"X-Envelope-To: " + ", ".join(envelope.rcpt_tos).encode() + b"\r\n")
            f.write(envelope.original_content or envelope.content)
        os.rename(name + ".tmp", name)
        return "250 Message accepted"


def main():
    port, folder = int(sys.argv[1]), sys.argv[2]
    os.makedirs(folder, exist_ok=True)
    controller = Controller(Sink(folder), hostname="127.0.0.1", port=port)
    controller.start()
    print("ready", flush=True)
    try:
        asyncio.get_event_loop().run_until_complete(asyncio.Event().wait())
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()


if __name__ == "__main__":
    main()

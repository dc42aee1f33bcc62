// A TCP proxy on 127.0.0.1 in front of TARGET_PORT that injects one fault per connection, run as
// its own process so a test blocked in spawnSync (mount, dd) does not stall it.
//   node fault-proxy.mjs TARGET_PORT PASS_EVERY COUNTS_FILE
// Connection 0 and every PASS_EVERY-th pass untouched; the others cycle through: drop the
// connection when the request arrives, stall it (never answer), answer 500 and close, or forward
// the answer but cut it short. Prints the listening port on stdout; counts go to COUNTS_FILE.
import { writeFileSync } from 'node:fs';
import net from 'node:net';

const [targetPort, passEvery, countsFile] = [Number(process.argv[2]), Number(process.argv[3]), process.argv[4]];
const faults = ['drop', 'stall', 'http500', 'truncate'];
const counts = { pass: 0, drop: 0, stall: 0, http500: 0, truncate: 0 };
let n = 0;
let bad = 0;

const server = net.createServer((client) => {
  client.on('error', () => undefined);
  const i = n++;
  const fault = i === 0 || i % passEvery === 0 ? 'pass' : faults[bad++ % faults.length];
  counts[fault]++;
  writeFileSync(countsFile, JSON.stringify(counts));
  if (fault === 'drop') return void client.once('data', () => client.destroy());
  if (fault === 'stall') return void client.on('data', () => undefined);
  if (fault === 'http500') {
    return void client.once('data', () => client.end('HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\nConnection: close\r\n\r\noops\n'));
  }
  const upstream = net.connect(targetPort, '127.0.0.1');
  upstream.on('error', () => client.destroy());
  upstream.on('close', () => client.destroy());
  client.on('close', () => upstream.destroy());
  client.pipe(upstream);
  if (fault === 'pass') return void upstream.pipe(client);
  // truncate: the headers and part of the body get through, then both sides are cut.
  let budget = 600 + Math.floor(Math.random() * 6000);
  upstream.on('data', (chunk) => {
    if (budget <= 0) return;
    const part = chunk.subarray(0, budget);
    budget -= part.length;
    client.write(part);
    if (budget <= 0) {
      client.destroy();
      upstream.destroy();
    }
  });
});
server.listen(0, '127.0.0.1', () => process.stdout.write(`${server.address().port}\n`));
process.on('SIGTERM', () => process.exit(0));

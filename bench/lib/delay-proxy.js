// A delaying TCP proxy on 127.0.0.1 (these machines have no netem): every chunk waits DELAY_MS
// before it is forwarded, in each direction, in order.
//   node bench/lib/delay-proxy.js TARGET_PORT DELAY_MS     (prints the listening port)
import net from 'node:net';

const [target, delay] = [Number(process.argv[2]), Number(process.argv[3])];

function delayed(from, to) {
  const queue = [];
  let timer = null;
  const pump = () => {
    timer = null;
    const now = Date.now();
    while (queue.length && queue[0].at <= now) to.write(queue.shift().data);
    if (queue.length) timer = setTimeout(pump, queue[0].at - now);
    else if (from.readableEnded) to.end();
  };
  from.on('data', (data) => {
    queue.push({ at: Date.now() + delay, data });
    timer ??= setTimeout(pump, delay);
  });
  from.on('end', () => {
    if (!queue.length && !timer) to.end();
  });
}

const server = net.createServer((client) => {
  client.setNoDelay(true);
  const upstream = net.connect(target, '127.0.0.1');
  upstream.setNoDelay(true);
  const close = () => {
    client.destroy();
    upstream.destroy();
  };
  client.on('error', close);
  upstream.on('error', close);
  client.on('close', close);
  upstream.on('close', close);
  delayed(client, upstream);
  delayed(upstream, client);
});
server.listen(0, '127.0.0.1', () => process.stdout.write(`${server.address().port}\n`));
process.on('SIGTERM', () => process.exit(0));

from sandbox_kernel.kernelapp import main

main()

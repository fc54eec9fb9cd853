from lora_func.demo import main

main()
